"""Observing the node: NVML and /proc, the kubelet's pod-resources, the Kubernetes API, and the Jupyter
services (gateways, JupyterHub, Kubeflow) each through its own adapter."""
