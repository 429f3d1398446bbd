"""Images in a kernel's outputs: each output's image (found as the client's adapters find it,
`kernel_service_client.outputs`) and a PNG's size."""

import base64
import binascii
from collections.abc import Sequence

from kernel_service_client.models import Output
from kernel_service_client.outputs import ImagePayload, image_payload


def image_payloads(outputs: Sequence[Output]) -> list[ImagePayload]:
    """One image per output that carries any (see `image_payload`), in order."""
    return [payload for output in outputs if (payload := image_payload(output)) is not None]


def png_size(data: str) -> tuple[int, int] | None:
    """Width and height from a base64 PNG's IHDR chunk, without decoding the whole image."""
    try:
        head = base64.b64decode(data[:32])
    except (binascii.Error, ValueError):
        return None
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
