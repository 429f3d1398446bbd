"""The kernels this service offers, and the languages a caller names them by.

Python is ipykernel, forked from the zygote (forkserver.py). Shipped beside it, each
found where the project's set-up installs it: Bash (bash_kernel, from PyPI), JavaScript and
TypeScript (Deno's own kernel, from PyPI's `deno`), R (IRkernel, Debian's
r-cran-irkernel). Any other Jupyter kernelspec installed where jupyter_client looks can
back a session too: its kernel runs in the same sandbox.

A kernel that speaks Jupyter's ipc transport itself (ipykernel and what is built on it)
is launched as it is; any other runs under the bridge (programs/kernel_bridge.py), which
gives it a TCP connection file inside the sandbox's private network namespace and relays
its channels to the ipc sockets the service connects to. A kernel whose interrupts are
signals has them sent by the bridge too (the service cannot signal into the sandbox's
PID namespace by pid).

What is missing is found here, once, at start-up: a kind whose runtime is not installed
is listed with its `problem`, and a session asking for it is refused with that sentence.
"""

import importlib.util
import logging
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from jupyter_client.kernelspec import KernelSpecManager

from kernel_service.errors import LanguageUnavailable, UnknownLanguage

log = logging.getLogger(__name__)

PYTHON = "python3"  # the default kernel, and its kernelspec name
BRIDGE_FILE = Path(__file__).parent / "programs" / "kernel_bridge.py"
BASH_LAUNCH_FILE = Path(__file__).parent / "programs" / "bash_kernel_launch.py"

Transport = Literal["ipc", "tcp"]
InterruptMode = Literal["signal", "message"]


class KernelChoiceError(ValueError):
    """The settings name a kernel or language this host does not have; says which."""


@dataclass(frozen=True)
class KernelKind:
    """One kernelspec as this service launches it."""

    name: str  # the kernelspec's name: python3, bash, deno, ir, ...
    display_name: str
    language: str  # its language, as its kernelspec names it (lower case)
    argv: tuple[str, ...] = ()  # with {connection_file} (and {resource_dir}); python3: ours
    env: dict[str, str] = field(default_factory=dict)
    interrupt_mode: InterruptMode = "signal"
    transport: Transport = "tcp"  # "tcp": run under the bridge
    # RLIMIT_AS applies; False for a runtime that reserves more address space than it uses
    # (V8): its memory is bounded by its memory cgroup alone
    address_space_limit: bool = True
    # the runtime's files outside /usr and the Python environment, mounted read-only
    read_only: tuple[Path, ...] = ()
    etc: tuple[str, ...] = ()  # entries of /etc it needs beyond the sandbox's own few
    resource_dir: Path | None = None  # its kernelspec's directory (logos), if installed
    # it may publish an execution's last output after its idle status and its reply (Deno
    # 2.9's execute_result, about 1 ms late, now and then): each execution is followed by a
    # round trip that lets such output arrive (kernel.py)
    late_iopub: bool = False
    problem: str | None = None  # why it cannot run here; None: it can

    @property
    def ready(self) -> bool:
        return self.problem is None

    @property
    def is_python(self) -> bool:
        return self.name == PYTHON

    @property
    def bridged(self) -> bool:
        """Run under the bridge: it needs TCP, or its interrupts are signals."""
        return not self.is_python and (self.transport == "tcp" or self.interrupt_mode == "signal")

    def command(self, connection_file: str) -> list[str]:
        """Its own command line (not Python's: that is the launcher's)."""
        return [arg.replace("{connection_file}", connection_file) for arg in self.argv]

    def unavailable(self, problem: str) -> "KernelKind":
        return replace(self, problem=problem)


@dataclass(frozen=True)
class Language:
    """A name a caller may give (`language`), the kernel it means and the language that
    kernel then runs (JavaScript and TypeScript share Deno's kernel)."""

    name: str
    kernel: str
    aliases: tuple[str, ...] = ()


# The languages shipped with the service, by the names callers use (E2B's among them).
SHIPPED_LANGUAGES = (
    Language("python", PYTHON, ("py", "python3", "ipython")),
    Language("bash", "bash", ("sh", "shell")),
    Language("javascript", "deno", ("js", "deno")),
    Language("typescript", "deno", ("ts",)),
    Language("r", "ir", ("ir",)),
    Language("java", "java", ("jjava",)),
)

# What a runtime needs of its sandbox beyond a kernelspec's argv, by its language.
_RUNTIMES: dict[str, dict[str, Any]] = {
    "r": {
        "etc": ("R",),  # R_HOME/etc is a link to /etc/R
        # fontconfig's cache (a plot's first) in the private /tmp, not the work directory
        "env": {"XDG_CACHE_HOME": "/tmp/cache"},
    },
    "java": {
        # the JDK's conf/ is a link to /etc/java-N-openjdk
        "etc": tuple(sorted(p.name for p in Path("/etc").glob("java-*"))),
        # the JVM reserves gigabytes of address space it never uses (its class space, code
        # cache, heap): RLIMIT_AS would stop it starting; the memory cgroup bounds it instead
        "address_space_limit": False,
        # a bounded heap (its default is a quarter of the host's memory, past the cgroup's
        # limit: it would be killed rather than raise OutOfMemoryError), and few threads
        # (RLIMIT_NPROC counts them): one GC thread, the quick compiler only
        "env": {"JAVA_TOOL_OPTIONS": "-Xmx768m -XX:+UseSerialGC -XX:TieredStopAtLevel=1"},
    },
}

# The shipped kernels whose kernelspecs the set-up installs (not found as programs): what
# to say when they are missing.
_SHIPPED_ELSEWHERE = (
    ("ir", "R", "r",
     "IRkernel is not installed (Debian: apt-get install r-base-core r-cran-irkernel; or "
     "scripts/setup)"),
    ("java", "Java (jjava)", "java",
     "JJava is not installed (pip install 'kernel-service[languages]'; it needs a Java "
     "runtime too, Debian: apt-get install openjdk-17-jre-headless; or scripts/setup)"),
)  # fmt: skip

PYTHON_KIND = KernelKind(
    name=PYTHON,
    display_name="Python 3",
    language="python",
    interrupt_mode="message",
    transport="ipc",
)


def _bash_kind() -> KernelKind:
    kind = KernelKind(
        name="bash",
        display_name="Bash",
        language="bash",
        # ipykernel underneath: ipc, and interrupts by message (it signals bash itself)
        # bash_kernel without pexpect's pause before each line (bash_kernel_launch.py)
        argv=(sys.executable, "-I", str(BASH_LAUNCH_FILE), "-f", "{connection_file}"),
        env={"PS1": "$ "},
        interrupt_mode="message",
        transport="ipc",
    )
    if importlib.util.find_spec("bash_kernel") is None:
        return kind.unavailable(
            "bash_kernel is not installed in the service's Python environment "
            "(pip install 'kernel-service[languages]', or scripts/setup)"
        )
    if shutil.which("bash") is None:
        return kind.unavailable("bash is not installed")
    return kind


def _deno_kind() -> KernelKind:
    kind = KernelKind(
        name="deno",
        display_name="Deno (JavaScript, TypeScript)",
        language="typescript",
        env={
            "DENO_DIR": "/tmp/deno",  # its cache: the sandbox's private /tmp
            "DENO_NO_UPDATE_CHECK": "1",
            "DENO_NO_PROMPT": "1",
            "NO_COLOR": "1",
        },
        # Deno's kernel accepts TCP connection files only ("invalid host" for ipc)
        transport="tcp",
        # SIGINT ends it (exit 130); its interrupt_request interrupts the code
        interrupt_mode="message",
        address_space_limit=False,
        late_iopub=True,
    )
    binary = _deno_binary()
    if binary is None:
        return kind.unavailable(
            "Deno is not installed (pip install 'kernel-service[languages]' brings PyPI's "
            "deno, or put `deno` on PATH)"
        )
    argv = (str(binary), "jupyter", "--kernel", "--conn", "{connection_file}")
    return replace(kind, argv=argv, read_only=_outside_usr_and_python(binary))


def _deno_binary() -> Path | None:
    if importlib.util.find_spec("deno") is not None:
        import deno  # optional: the languages extra

        found = Path(deno.find_deno_bin())
        if found.is_file():
            return found.resolve()
    on_path = shutil.which("deno")
    return Path(on_path).resolve() if on_path else None


def _installed_kinds(known: set[str]) -> list[KernelKind]:
    """Every other kernelspec installed where Jupyter looks (R's among them)."""
    manager = KernelSpecManager()
    # the names that choose a shipped language, but the kernelspecs they choose (ir, java)
    aliases = {n for language in SHIPPED_LANGUAGES for n in (language.name, *language.aliases)}
    aliases -= {language.kernel for language in SHIPPED_LANGUAGES}
    kinds = []
    for name, resource_dir in sorted(manager.find_kernel_specs().items()):
        if name in known or name == PYTHON:
            continue  # ours, whatever ipykernel installed under that name
        # What a caller reads names no host path (its log line does): kernelspecs are
        # listed to every API key.
        try:
            spec = manager.get_kernel_spec(name)
        except Exception as exc:  # a broken kernel.json: listed, not offered
            log.warning("kernelspec %s (%s) cannot be read: %s", name, resource_dir, exc)
            problem = f"its kernel.json cannot be read ({type(exc).__name__})"
            kinds.append(KernelKind(name, name, name, problem=problem))
            continue
        kind = _kind_of_spec(name, Path(resource_dir), spec.to_dict())
        if name.lower() in aliases:  # a caller naming it would get the shipped language
            kind = kind.unavailable(
                f"its name is a name of one of the service's languages: rename its "
                f"kernelspec directory ({name!r}) to offer it"
            )
        kinds.append(kind)
    return kinds


def _kind_of_spec(name: str, resource_dir: Path, spec: dict[str, object]) -> KernelKind:
    raw_argv = spec.get("argv")
    argv = tuple(
        str(arg).replace("{resource_dir}", str(resource_dir))
        for arg in (raw_argv if isinstance(raw_argv, list) else [])
    )
    env = spec.get("env")
    mode = spec.get("interrupt_mode")
    language = str(spec.get("language") or name).lower()
    kind = KernelKind(
        name=name,
        display_name=str(spec.get("display_name") or name),
        language=language,
        argv=argv,
        env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
        interrupt_mode="message" if mode == "message" else "signal",
        transport="tcp",  # what every kernel speaks (JJava's JeroMQ fakes ipc with TCP)
        resource_dir=resource_dir,
    )
    needs = _RUNTIMES.get(language, {})
    kind = replace(
        kind,
        etc=needs.get("etc", ()),
        address_space_limit=needs.get("address_space_limit", True),
        env={**needs.get("env", {}), **kind.env},
    )
    if not argv:
        return kind.unavailable("its kernel.json has no argv")
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if program is None or not Path(program).is_file():
        return kind.unavailable(f"its program {Path(argv[0]).name!r} is not installed")
    program_path = Path(program).resolve()
    read_only = _outside_usr_and_python(program_path, resource_dir.resolve())
    return replace(kind, argv=(str(program_path), *argv[1:]), read_only=read_only)


def _outside_usr_and_python(*paths: Path) -> tuple[Path, ...]:
    """Which of `paths` a sandbox does not mount already (/usr and the Python environment)."""
    mounted = (Path("/usr"), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    return tuple(p for p in paths if not any(p.is_relative_to(m) for m in mounted))


@dataclass(frozen=True)
class KernelCatalog:
    """The kernels this service offers, and the names callers may use for them."""

    kinds: dict[str, KernelKind]
    languages: tuple[Language, ...]

    @classmethod
    def python_only(cls) -> "KernelCatalog":
        return cls({PYTHON: PYTHON_KIND}, SHIPPED_LANGUAGES[:1])

    @classmethod
    def discover(cls, offered: tuple[str, ...] = ()) -> "KernelCatalog":
        """What is installed here; `offered`: the kernelspec names to offer besides Python
        (empty: all that are found)."""
        shipped = [PYTHON_KIND, _bash_kind(), _deno_kind()]
        kinds = {kind.name: kind for kind in shipped}
        kinds.update((kind.name, kind) for kind in _installed_kinds(set(kinds)))
        for name, display_name, language, problem in _SHIPPED_ELSEWHERE:
            if name not in kinds:  # listed, so that a caller learns why it cannot run
                kinds[name] = KernelKind(name, display_name, language, problem=problem)
        if offered:
            # a language's name or alias stands for its kernelspec (r: ir, javascript: deno)
            by_name = {
                n: lang.kernel for lang in SHIPPED_LANGUAGES for n in (lang.name, *lang.aliases)
            }
            offered = tuple(by_name.get(name.lower(), name) for name in offered)
            unknown = sorted(set(offered) - set(kinds))
            if unknown:
                raise KernelChoiceError(
                    f"KERNEL_SERVICE_KERNELS names kernels not installed here: "
                    f"{', '.join(unknown)} (installed: {', '.join(sorted(kinds))})"
                )
            kinds = {n: k for n, k in kinds.items() if n == PYTHON or n in offered}
        languages = [lang for lang in SHIPPED_LANGUAGES if lang.kernel in kinds]
        return cls(kinds, tuple(languages))

    def resolve(self, asked: str | None) -> tuple[KernelKind, str]:
        """The kernel for the language (or kernelspec name) `asked`, and the language's
        name; None: Python. Raises UnknownLanguage (a name nobody offers) or
        LanguageUnavailable (offered, but its runtime is missing here)."""
        if asked is None:
            return self.kinds[PYTHON], "python"
        wanted = asked.strip().lower()
        for language in self.languages:
            if wanted == language.name or wanted in language.aliases:
                kind = self.kinds[language.kernel]
                break
        else:
            spec = self.kinds.get(wanted) or self.kinds.get(asked.strip())  # a kernelspec
            if spec is None:
                raise UnknownLanguage(asked, self.names())
            kind, language = spec, Language(spec.language, spec.name)
        if kind.problem is not None:
            raise LanguageUnavailable(language.name, kind.problem)
        return kind, language.name

    def kind(self, name: str) -> KernelKind:
        """The kind a recorded session names (one no longer offered: its problem says so)."""
        found = self.kinds.get(name)
        if found is None:
            return KernelKind(name, name, name, problem="this service no longer offers it")
        return found

    def names(self) -> list[str]:
        """The language names a caller may use, then the other kernelspecs' names."""
        named = [language.name for language in self.languages]
        shipped = {language.kernel for language in self.languages}
        return named + [name for name in self.kinds if name not in shipped]

    def accepted_names(self) -> list[str]:
        """Every name `resolve` takes (in lower case): languages, aliases, kernelspecs."""
        names = [n for language in self.languages for n in (language.name, *language.aliases)]
        return list(dict.fromkeys([*names, *(name.lower() for name in self.kinds)]))

    def languages_of(self, kind: KernelKind) -> list[str]:
        """The names that choose `kind` (its languages and their aliases, or its name)."""
        names = [
            name
            for language in self.languages
            if language.kernel == kind.name
            for name in (language.name, *language.aliases)
        ]
        return names or [kind.name]

    def ready_languages(self) -> list[str]:
        """The names of the languages and kernelspecs that can run here."""
        return [name for name in self.names() if self._kind_named(name).ready]

    def _kind_named(self, name: str) -> KernelKind:
        for language in self.languages:
            if language.name == name:
                return self.kinds[language.kernel]
        return self.kinds[name]

    def report(self) -> list[str]:
        """One line per kernel that cannot run here, for the start-up log."""
        return [f"{k.name} ({k.display_name}): {k.problem}" for k in self.kinds.values()
                if k.problem is not None]  # fmt: skip
