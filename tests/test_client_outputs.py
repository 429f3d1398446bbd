"""kernel_service_client.outputs: the image an output carries and text cut in the middle,
read the same way by the service and by the client's adapters."""

import base64

from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    StreamOutput,
)
from kernel_service_client.outputs import ImagePayload, cut_middle, image_payload

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode()


def test_short_text_is_not_cut() -> None:
    assert cut_middle("abcdef", 6) == ("abcdef", 0)


def test_long_text_keeps_its_head_and_tail() -> None:
    text, omitted = cut_middle("a" * 50 + "b" * 50, 10)
    assert omitted == 90
    assert text == "aaaaa\n[... 90 characters omitted ...]\nbbbbb"


def test_a_note_cut_away_counts_what_it_stood_for() -> None:
    note = "[... 1,000 characters omitted ...]"
    text = "x" * 20 + note + "y" * 20
    _, omitted = cut_middle(text, 20, (note, 1000))
    assert omitted == len(text) - 20 + 1000 - len(note)
    kept = "h" * 10 + "t" * 30 + note  # the note is in the tail: not counted again
    assert cut_middle(kept, 2 * len(note), (note, 1000))[1] == len(kept) - 2 * len(note)


def test_the_first_real_image_of_an_output_is_its_image() -> None:
    wrapped = "\n".join(PNG[i : i + 20] for i in range(0, len(PNG), 20))
    shown = DisplayDataOutput(data={"text/plain": "<Figure>", "image/png": wrapped})
    assert image_payload(shown) == ImagePayload("image/png", PNG)
    broken = ExecuteResultOutput(data={"image/png": "not base64!", "image/jpeg": PNG})
    assert image_payload(broken) == ImagePayload("image/jpeg", PNG)
    svg = DisplayDataOutput(data={"image/svg+xml": "<svg/>"})
    assert image_payload(svg) == ImagePayload("image/svg+xml", base64.b64encode(b"<svg/>").decode())


def test_outputs_without_an_image() -> None:
    assert image_payload(DisplayDataOutput(data={"text/plain": "1"})) is None
    assert image_payload(DisplayDataOutput(data={"image/png": "%%%"})) is None
    assert image_payload(DisplayDataOutput(data={"image/png": {"not": "text"}})) is None
    assert image_payload(StreamOutput(name="stdout", text="image/png")) is None
    assert image_payload(ErrorOutput(ename="E", evalue="v")) is None
