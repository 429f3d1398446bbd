"""Images in a kernel's outputs: which output holds one, its bytes as base64, its size."""

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from kernel_service_client.models import IMAGE_MIMES, DisplayDataOutput, ExecuteResultOutput, Output


@dataclass(frozen=True)
class ImagePayload:
    """An image found in an output, before it is stored and given a URL."""

    mime: str
    data: str


def image_payloads(outputs: Sequence[Output]) -> list[ImagePayload]:
    """One image per output that carries any (see `image_payload`), in order."""
    return [payload for output in outputs if (payload := image_payload(output)) is not None]


def image_payload(output: Output) -> ImagePayload | None:
    """The output's image: the first of IMAGE_MIMES it has that really is one.

    Renderers pair outputs with a result's `images` through this, so an output whose image
    data is not valid (it stays in `outputs` as sent) never takes another output's image.
    """
    if not isinstance(output, DisplayDataOutput | ExecuteResultOutput):
        return None
    for mime in IMAGE_MIMES:
        value = output.data.get(mime)
        if not isinstance(value, str):
            continue
        if mime == "image/svg+xml":
            return ImagePayload(mime, base64.b64encode(value.encode(errors="replace")).decode())
        data = value.replace("\n", "")
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            continue  # not an image after all
        return ImagePayload(mime, data)
    return None


def png_size(data: str) -> tuple[int, int] | None:
    """Width and height from a base64 PNG's IHDR chunk, without decoding the whole image."""
    try:
        head = base64.b64decode(data[:32])
    except (binascii.Error, ValueError):
        return None
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
