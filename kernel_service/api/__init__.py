"""The HTTP edge, and the only package that imports fastapi."""

from kernel_service.api.app import create_app

__all__ = ["create_app"]
