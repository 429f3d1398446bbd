"""Reading outputs the same way on both sides of the API: the image an output carries, and
long text cut in the middle. Pure; the service's collector and renderer use these too, so a
result and an adapter's wording of it agree."""

import base64
import binascii
from dataclasses import dataclass

from kernel_service_client.models import IMAGE_MIMES, DisplayDataOutput, ExecuteResultOutput, Output


@dataclass(frozen=True)
class ImagePayload:
    """An image found in an output, before it is stored and given a URL."""

    mime: str
    data: str


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


def cut_middle(text: str, limit: int, inner_note: tuple[str, int] = ("", 0)) -> tuple[str, int]:
    """`text` cut in the middle to about `limit` characters, and how many were left out.

    `inner_note`: a note in `text` that stands for characters cut earlier, and how many;
    if this cut removes it, its count is added to this one's (the note counts what was
    printed, not what was left of it)."""
    if len(text) <= limit:
        return text, 0
    half = limit // 2
    omitted = len(text) - 2 * half
    note, earlier = inner_note
    if note and note in text[half : len(text) - half]:
        omitted += earlier - len(note)
    return f"{text[:half]}\n[... {omitted:,} characters omitted ...]\n{text[-half:]}", omitted
