"""The README's configuration table must name every setting the service reads."""

from pathlib import Path

from kernel_service.config import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        name for name in Settings.model_fields if f"`KERNEL_SERVICE_{name.upper()}`" not in README
    ]
    assert missing == []
