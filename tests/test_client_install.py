"""The client is light to install: it requires httpx and pydantic, its wheel holds its own
package only, and importing it loads nothing of the service or the kernel stack."""

import ast
import email
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[1] / "client"
PACKAGE = "kernel_service_client"
# What a light install must not bring, nor an import load.
HEAVY = (
    "kernel_service",
    "jupyter_client",
    "zmq",
    "ipykernel",
    "numpy",
    "pandas",
    "matplotlib",
    "fastapi",
    "starlette",
)


def required(requirements: Iterable[str]) -> set[str]:
    """The names of the requirements that hold without extras."""
    return {
        re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        for requirement in requirements
        if "extra ==" not in requirement
    }


def test_the_installed_client_requires_httpx_and_pydantic() -> None:
    requirements = importlib.metadata.requires("kernel-service-client") or []
    assert required(requirements) == {"httpx", "pydantic"}


def test_a_wheel_of_the_client_holds_only_its_package(tmp_path: Path) -> None:
    # built from a copy: setuptools' build/ would otherwise keep modules removed since
    source = tmp_path / "client"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    wheel_command = ["pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(tmp_path)]
    built = subprocess.run(
        [sys.executable, "-m", *wheel_command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata] = [name for name in names if name.endswith(".dist-info/METADATA")]
        requirements = email.message_from_bytes(archive.read(metadata)).get_all("Requires-Dist")
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {PACKAGE}
    assert f"{PACKAGE}/py.typed" in names
    assert required(requirements or []) == {"httpx", "pydantic"}


def test_importing_the_client_loads_nothing_heavy() -> None:
    # -I: neither this process's path nor PYTHONPATH; the client is taken from this tree
    script = (
        f"import sys; sys.path.insert(0, {str(CLIENT)!r})\n"
        f"import {PACKAGE}, {PACKAGE}.client, {PACKAGE}.tools.spec, {PACKAGE}.tools.common\n"
        f"import {PACKAGE}.outputs, {PACKAGE}.models\n"
        f"assert {PACKAGE}.__file__.startswith({str(CLIENT)!r}), {PACKAGE}.__file__\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    ran = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    loaded = set(ran.stdout.split())
    assert {"httpx", "pydantic", PACKAGE} <= loaded
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


def test_no_module_of_the_client_imports_the_service() -> None:
    for path in sorted((CLIENT / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] != "kernel_service", f"{path}: imports {module}"
