"""The kernel catalog alone (no server, no kernel started): which names choose which kernel,
what is refused and with which words, installed kernelspecs read from a JUPYTER_PATH of
the test's own, and the settings that shape what is offered."""

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kernel_service.config import Settings
from kernel_service.errors import LanguageUnavailable, UnknownLanguage
from kernel_service.kernel import KernelStartError
from kernel_service.kernel.kernelspecs import KernelCatalog
from kernel_service.runtime import Runtime
from tests.conftest import make_settings


def install(root: Path, name: str, spec: dict[str, object] | str) -> Path:
    """A kernelspec `name` under `root` (a JUPYTER_PATH entry): its kernel.json as given
    (a string is written as it is, to make a broken one)."""
    directory = root / "kernels" / name
    directory.mkdir(parents=True)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (directory / "kernel.json").write_text(text)
    return directory


@pytest.fixture
def jupyter_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory jupyter_client searches for kernelspecs, empty until a test installs one."""
    root = tmp_path / "jupyter"
    root.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    return root


def test_none_is_python() -> None:
    kind, language = KernelCatalog.discover().resolve(None)
    assert (kind.name, language) == ("python3", "python")
    assert kind.is_python and kind.transport == "ipc"


@pytest.mark.parametrize(
    ("asked", "kernel", "language"),
    [
        ("python", "python3", "python"),
        ("py", "python3", "python"),
        ("python3", "python3", "python"),
        ("bash", "bash", "bash"),
        ("sh", "bash", "bash"),
        ("javascript", "deno", "javascript"),
        ("js", "deno", "javascript"),
        ("deno", "deno", "javascript"),
        ("typescript", "deno", "typescript"),
        ("ts", "deno", "typescript"),
        ("r", "ir", "r"),
        ("ir", "ir", "r"),
        (" R ", "ir", "r"),  # as a caller may type it
    ],
)
def test_languages_resolve_by_name_alias_and_kernelspec_name(
    asked: str, kernel: str, language: str
) -> None:
    catalog = KernelCatalog.discover()
    if not catalog.kinds[kernel].ready:
        pytest.skip(f"{kernel} is not ready here: {catalog.kinds[kernel].problem}")
    kind, name = catalog.resolve(asked)
    assert (kind.name, name) == (kernel, language)


def test_an_unknown_language_is_refused_with_the_choices() -> None:
    catalog = KernelCatalog.discover()
    with pytest.raises(UnknownLanguage) as refused:
        catalog.resolve("cobol")
    assert refused.value.asked == "cobol"
    assert refused.value.offered == catalog.names()
    assert {"python", "bash", "javascript", "typescript", "r"} <= set(refused.value.offered)
    assert "'cobol'" in str(refused.value) and "python" in str(refused.value)


def test_an_installed_kernelspec_is_offered_by_its_name(jupyter_path: Path) -> None:
    resource_dir = install(
        jupyter_path,
        "echo-kernel",
        {
            "argv": ["sh", "{resource_dir}/run", "-f", "{connection_file}"],
            "display_name": "Echo",
            "language": "Echo",
            "interrupt_mode": "message",
            "env": {"ECHO_MODE": "loud"},
        },
    )
    catalog = KernelCatalog.discover()
    kind, language = catalog.resolve("echo-kernel")
    assert (kind.name, kind.display_name, language) == ("echo-kernel", "Echo", "echo")
    assert kind.ready and kind.bridged and kind.transport == "tcp"
    assert kind.interrupt_mode == "message" and kind.env == {"ECHO_MODE": "loud"}
    assert kind.resource_dir == resource_dir
    assert Path(kind.argv[0]).name in ("sh", "dash", "bash")  # found on PATH, resolved
    assert kind.command("/c/k.json") == [*kind.argv[:2], "-f", "/c/k.json"]
    assert kind.argv[1] == f"{resource_dir}/run"
    assert "echo-kernel" in catalog.names() and "echo-kernel" in catalog.ready_languages()
    assert catalog.languages_of(kind) == ["echo-kernel"]


def test_a_kernelspec_whose_program_is_missing_is_listed_not_ready(jupyter_path: Path) -> None:
    install(
        jupyter_path,
        "ghost",
        {"argv": ["/nonexistent/ghost-kernel", "{connection_file}"], "display_name": "Ghost",
         "language": "ghost"},
    )  # fmt: skip
    catalog = KernelCatalog.discover()
    ghost = catalog.kinds["ghost"]
    assert not ghost.ready
    # named without the host's path: every API key reads it
    assert ghost.problem == "its program 'ghost-kernel' is not installed"
    assert "ghost" in catalog.names() and "ghost" not in catalog.ready_languages()
    assert f"ghost (Ghost): {ghost.problem}" in catalog.report()
    with pytest.raises(LanguageUnavailable) as refused:
        catalog.resolve("ghost")
    assert refused.value.problem == ghost.problem
    assert refused.value.language == "ghost"
    assert ghost.problem in str(refused.value)


def test_a_program_not_on_path_and_a_spec_without_argv_are_not_ready(
    jupyter_path: Path,
) -> None:
    install(jupyter_path, "unfound", {"argv": ["no-such-kernel-program"], "language": "x"})
    install(jupyter_path, "argless", {"argv": [], "display_name": "Argless", "language": "x"})
    catalog = KernelCatalog.discover()
    assert catalog.kinds["unfound"].problem == (
        "its program 'no-such-kernel-program' is not installed"
    )
    problem = catalog.kinds["argless"].problem
    assert problem is not None and problem.endswith("has no argv")


def test_a_broken_kernel_json_is_listed_with_its_problem(jupyter_path: Path) -> None:
    install(jupyter_path, "broken", "{not json")
    catalog = KernelCatalog.discover()
    broken = catalog.kinds["broken"]
    assert not broken.ready
    assert broken.problem == "its kernel.json cannot be read (JSONDecodeError)"
    with pytest.raises(LanguageUnavailable):
        catalog.resolve("broken")


def test_a_shipped_kind_that_is_not_ready_is_refused_with_its_problem() -> None:
    discovered = KernelCatalog.discover()
    problem = "bash is not installed"
    kinds = {**discovered.kinds, "bash": discovered.kinds["bash"].unavailable(problem)}
    catalog = KernelCatalog(kinds, discovered.languages)
    for asked in ("bash", "sh"):
        with pytest.raises(LanguageUnavailable) as refused:
            catalog.resolve(asked)
        assert (refused.value.language, refused.value.problem) == ("bash", problem)
        assert "cannot run on this service: bash is not installed" in str(refused.value)
    assert "bash" not in catalog.ready_languages() and "bash" in catalog.names()
    assert catalog.report() == [f"bash (Bash): {problem}"]


def test_offered_kernels_restrict_what_is_offered() -> None:
    settings = Settings(kernels=" bash , ")
    assert settings.offered_kernels() == ("bash",)
    catalog = KernelCatalog.discover(settings.offered_kernels())
    assert set(catalog.kinds) == {"python3", "bash"}  # Python is always offered
    assert [language.name for language in catalog.languages] == ["python", "bash"]
    assert catalog.names() == ["python", "bash"]
    for left_out in ("r", "javascript", "ts", "ir"):
        with pytest.raises(UnknownLanguage) as refused:
            catalog.resolve(left_out)
        assert refused.value.offered == ["python", "bash"]
    assert catalog.resolve("sh")[0].name == "bash"


def test_offered_kernels_may_be_named_by_their_languages() -> None:
    catalog = KernelCatalog.discover(Settings(kernels="R,javascript").offered_kernels())
    assert set(catalog.kinds) == {"python3", "ir", "deno"}


def test_offering_a_kernel_not_installed_is_an_error() -> None:
    with pytest.raises(ValueError, match="KERNEL_SERVICE_KERNELS names kernels not installed"):
        KernelCatalog.discover(("bash", "fortran"))


def test_the_unrestricted_catalog_offers_every_installed_kernelspec(jupyter_path: Path) -> None:
    install(jupyter_path, "extra", {"argv": ["sh", "{connection_file}"], "language": "sh"})
    everything = KernelCatalog.discover(Settings(kernels="").offered_kernels())
    assert {"python3", "bash", "deno", "ir", "extra"} <= set(everything.kinds)
    only = KernelCatalog.discover(("extra",))
    assert set(only.kinds) == {"python3", "extra"}
    assert only.names() == ["python", "extra"]


def test_a_recorded_kind_no_longer_offered_says_so() -> None:
    catalog = KernelCatalog.discover(("bash",))
    gone = catalog.kind("ir")
    assert gone.problem == "this service no longer offers it"
    assert catalog.kind("bash") is catalog.kinds["bash"]


def test_pool_sizes_are_read() -> None:
    settings = Settings(pool_sizes=" bash=1, R=2 ,,ts=0")
    assert settings.language_pool_sizes() == {"bash": 1, "r": 2, "ts": 0}
    assert Settings().language_pool_sizes() == {}


@pytest.mark.parametrize("pool_sizes", ["bash", "bash=", "=1", "bash=one", "bash=-1", "r:1"])
def test_malformed_pool_sizes_are_refused_at_start(pool_sizes: str) -> None:
    with pytest.raises(ValidationError, match="KERNEL_SERVICE_POOL_SIZES") as refused:
        Settings(pool_sizes=pool_sizes)
    assert "is not `language=size`" in str(refused.value)


def test_an_installed_kernelspec_named_as_a_language_is_not_offered(jupyter_path: Path) -> None:
    # `sh` chooses bash: a kernelspec of that name could never be reached by its name
    install(jupyter_path, "sh", {"argv": ["/bin/sh", "{connection_file}"], "language": "sh"})
    catalog = KernelCatalog.discover()
    assert not catalog.kinds["sh"].ready
    assert "rename its kernelspec directory ('sh')" in (catalog.kinds["sh"].problem or "")
    kind, language = catalog.resolve("sh")
    assert (kind.name, language) == ("bash", "bash")


def test_a_kind_that_cannot_run_is_never_started(tmp_path: Path) -> None:
    """A session carried on from a host that had the runtime (or its memory cgroup) gets
    no kernel of that kind here, whatever asks for one: it is refused before any launch."""
    runtime = Runtime(make_settings(tmp_path, sandbox="none"))
    cannot = KernelCatalog.discover().kinds["python3"].unavailable("no memory cgroup here")
    with pytest.raises(KernelStartError, match="cannot run here: no memory cgroup here"):
        asyncio.run(runtime._start_kernel(tmp_path / "work", cannot))
    assert not (tmp_path / "connection").exists() or not any((tmp_path / "connection").iterdir())
