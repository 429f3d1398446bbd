"""Arrows point down the flow: a part of the service imports only the parts listed below it
(docs/architecture.md, "Layering"). Which third-party packages a folder may import is ruff's
banned-api rule (pyproject.toml, kernel_service/api/ruff.toml, kernel_service/kernel/ruff.toml)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# Top to bottom: each may import those on its line and after it, never those before it.
LAYERS = [
    {"__main__", "cli", "config_doc", "drain"},
    {"cluster"},
    {"api"},
    {"runtime"},
    {"sessions"},
    {"metrics"},
    {"kernel"},
    {"kernel.programs"},
    {"execution"},
    {"store", "tool_spec"},
    {"workdir"},
    {"config", "errors", "kernel_service", "kernel_service_client"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str | None:
    """The part of the service a module belongs to (None: not ours)."""
    names = module.removesuffix(".__init__").split(".")
    if names[0] == "kernel_service_client":
        return "kernel_service_client"
    if names[0] != "kernel_service":
        return None
    if len(names) == 1:
        return "kernel_service"
    if names[1:3] == ["kernel", "programs"]:
        return "kernel.programs"
    return names[1]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_every_part_has_a_layer() -> None:
    parts = {
        part_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for path in (ROOT / "kernel_service").rglob("*.py")
    }
    assert parts - RANK.keys() == set()


def test_imports_point_down() -> None:
    upward: list[str] = []
    for path in (ROOT / "kernel_service").rglob("*.py"):
        source = part_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert source is not None
        for module in imports_of(path):
            target = part_of(module)
            if target is None or target == source:
                continue
            if RANK[target] < RANK[source]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert upward == []


def test_the_client_imports_nothing_of_the_service() -> None:
    for path in (ROOT / "client" / "kernel_service_client").rglob("*.py"):
        assert not any(part_of(m) not in (None, "kernel_service_client") for m in imports_of(path))


def test_the_zygote_imports_nothing_of_the_service() -> None:
    """It runs as a file: the standard library and what its kernels preload (ipykernel)."""
    zygote = ROOT / "kernel_service" / "kernel" / "programs" / "zygote.py"
    modules = {m.split(".")[0] for m in imports_of(zygote)}
    assert modules - set(sys.stdlib_module_names) == {"ipykernel"}
