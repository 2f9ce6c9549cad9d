"""Errors of the inference service that every protocol answers in its own way."""


class RequestTimeout(Exception):
    """The request ran past settings.serve.request_timeout_s (REST 504, gRPC DEADLINE_EXCEEDED)."""
