"""The front doors: HTTP and MCP. The only package that imports the web framework (a lint
rule: the banned-api list in pyproject.toml, narrowed here by ruff.toml)."""

from kernel_service.api.app import create_app

__all__ = ["create_app"]
