"""gpu-reclaimer: find Jupyter kernels holding idle GPUs, show the waste, give the GPUs back by policy."""

__version__ = "0.1.0"
