"""Generated protobuf / gRPC stubs for the kubelet pod-resources v1 API (List only); see api.proto for the source.

Do not edit the ``api_pb2*`` files. Regenerate from the repository root with:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. reclaimer/observe/_podresources_pb/api.proto && sed -i 's/^from reclaimer\\._podresources_pb import api_pb2/from . import api_pb2/' reclaimer/observe/_podresources_pb/api_pb2_grpc.py
"""
