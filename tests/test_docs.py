"""The README and docs/ stay true to the code: the configuration page is what the generator
makes from Settings, every setting named exists, every example block parses and imports
what exists, and every relative link leads somewhere."""

import ast
import importlib
import json
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from kernel_service import config_doc
from kernel_service.config import Settings

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# variables that are not settings: read by a test, or by the example agent
NOT_SETTINGS = {"KERNEL_SERVICE_TEST_CHROMIUM", "KERNEL_SERVICE_URL"}

_FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[\w+-]*)\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S
)
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(?P<title>.+?) *$", re.M)
_HTML_ID = re.compile(r'<a id="(?P<id>[^"]+)"')


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(*languages: str) -> list[object]:
    """(page, body) of every fenced block in one of these languages, named page:line."""
    found: list[object] = []
    for page in PAGES:
        text = page.read_text()
        for block in _FENCE.finditer(text):
            if block["lang"] in languages:
                line = text.count("\n", 0, block.start()) + 1
                found.append(pytest.param(_name(page), block["body"], id=f"{_name(page)}:{line}"))
    return found


def _slug(title: str) -> str:
    """The id Python-Markdown's toc gives a heading (as MkDocs builds it)."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", title)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(h["title"]) for h in _HEADING.finditer(text)} | {
        a["id"] for a in _HTML_ID.finditer(text)
    }


def test_configuration_page_is_generated_from_settings() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == config_doc.render(), (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/python -m kernel_service.config_doc > docs/configuration.md`"
    )


def test_every_setting_is_on_the_configuration_page() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        name for name in Settings.model_fields if f"`KERNEL_SERVICE_{name.upper()}`" not in page
    ]
    assert missing == []


def test_every_variable_named_is_a_setting() -> None:
    settings = {f"KERNEL_SERVICE_{name.upper()}" for name in Settings.model_fields}
    unknown = {
        f"{_name(page)}: {variable}"
        for page in PAGES
        for variable in re.findall(r"KERNEL_SERVICE_[A-Z0-9_]*[A-Z0-9]", page.read_text())
        if variable not in settings | NOT_SETTINGS
    }
    assert unknown == set()


@pytest.mark.parametrize(("page", "body"), _blocks("python"))
def test_python_blocks_compile(page: str, body: str) -> None:
    # examples may await at the top, as in a notebook or `python -m asyncio`
    compile(body, page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


@pytest.mark.parametrize(("page", "body"), _blocks("python"))
def test_python_blocks_import_what_exists(page: str, body: str) -> None:
    tree = ast.parse(body)  # the parser takes a top-level await; the compiler would not
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kernel_service"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"


@pytest.mark.parametrize(("page", "body"), _blocks("sh", "bash"))
def test_shell_blocks_parse(page: str, body: str) -> None:
    checked = subprocess.run(
        ["bash", "-n"], input=body, text=True, capture_output=True, check=False
    )
    assert checked.returncode == 0, f"{page}: {checked.stderr}"


@pytest.mark.parametrize(("page", "body"), _blocks("json"))
def test_json_blocks_parse(page: str, body: str) -> None:
    json.loads(body)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for link in _LINK.finditer(_FENCE.sub("", page.read_text())):
        target = link["target"]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and file.suffix == ".md" and anchor not in _anchors(file)
        if not file.exists() or missing_anchor:
            broken.append(target)
    assert broken == [], f"{_name(page)}: links to nothing"
