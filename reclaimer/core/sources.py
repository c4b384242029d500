"""Kernel sources that are not configured gateways: the ``KernelActivity.gateway`` (and ``gateway`` label) of a
kernel seen through JupyterHub or a Kubeflow notebook server."""

from __future__ import annotations

from typing import Final

HUB_GATEWAY: Final = "jupyterhub"  # a kernel observed in a JupyterHub user server
KUBEFLOW_GATEWAY: Final = "kubeflow"  # a kernel observed through a Kubeflow notebook server
