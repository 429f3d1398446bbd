"""The Python client of kernel-service: sync and async sessions over its HTTP API.

from kernel_service_client import Client

with Client("http://127.0.0.1:8000") as client, client.session() as session:
    print(session.execute("1 + 1").text)
"""

from kernel_service_client.client import (
    DEFAULT_URL,
    AsyncClient,
    AsyncSession,
    Client,
    KernelServiceError,
    Session,
    StreamEvent,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "KernelServiceError",
    "Session",
    "StreamEvent",
]
