"""The application: the daemon's loops, the per-cycle pipeline, the command line and the demo."""
