"""Exporting what was seen and done: the report, Prometheus metrics, the HTTP endpoints and the logs."""
