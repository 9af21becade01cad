"""Serving over gRPC: protocol mapping, session tokens, the scheduler, the service,
the server's lifecycle, metrics and the Python client."""
