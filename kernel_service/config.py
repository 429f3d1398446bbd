"""Settings, read from KERNEL_SERVICE_* variables; passed in, never global."""

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything an operator may tune. Defaults work out of the box on 127.0.0.1."""

    model_config = SettingsConfigDict(env_prefix="KERNEL_SERVICE_", frozen=True)

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP server binds to.")
    log_level: str = Field("info", description="Log level of the service (debug, info, ...).")

    max_head_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request head (request line and headers) read; a bigger one gets "
        "431 and its connection is closed.",
    )
    head_timeout: PositiveFloat = Field(
        10.0,
        description="Seconds a connection has to send a complete request head, from its start "
        "(or from the first byte of a later request on it); then it is closed.",
    )
    max_connections: NonNegativeInt = Field(
        0,
        description="Open HTTP connections at most (0: what the open-file limit leaves once "
        "every kernel has its files). At the cap a new connection replaces the one that has "
        "waited longest on an unfinished head, or gets 503 and is closed.",
    )
    keep_alive_timeout: PositiveInt = Field(
        5, description="Seconds an idle kept-alive HTTP connection stays open."
    )

    connection_dir: Path = Field(
        Path("connection"), description="Where kernel connection files are written (0600)."
    )
    work_dir: Path = Field(
        Path("workspaces"),
        description="Parent of each session's working directory; the service's alone (a "
        "directory holding other files is refused: what no session owns is deleted).",
    )
    matplotlib_dir: Path = Field(
        Path.home() / ".cache" / "kernel-service" / "matplotlib",
        description="MPLCONFIGDIR shared by kernels; the font cache is built there once.",
    )
    state_dir: Path = Field(
        Path("state"),
        description="Where the session registry lives (SQLite, 0700); the next start of the "
        "service adopts the sessions and kernels recorded there. One service per directory.",
    )
    keep_kernels: bool = Field(
        False,
        description="On a graceful stop (SIGTERM), leave kernels and sessions for the next "
        "start (a restart or an upgrade) instead of ending them.",
    )
    orphan_timeout: float = Field(
        600.0,
        ge=0,
        description="Seconds kernels outlive a service that stopped without ending them (a "
        "crash, or keep_kernels) before they are ended, if no service has started again.",
    )
    history_mb: PositiveInt = Field(
        64,
        description="MiB of stored execution results per session; past it the oldest "
        "results are dropped (their code and status stay in the history).",
    )

    max_sessions: PositiveInt = Field(64, description="Live sessions at most; more get 429.")
    cell: int | None = Field(
        None,
        ge=0,
        le=0xFFFF,
        description="This service's index as a cell of a cluster (0-65535): every id it "
        "makes starts with the index as 4 hex digits, which a proxy routes by "
        "(docs/scaling.md). Unset: a service alone.",
    )
    fork_server: bool = Field(
        True,
        description="Fork kernels from a process that has imported ipykernel and the preload "
        "modules once (fast starts, shared memory); false: start each kernel afresh.",
    )
    pool_size: NonNegativeInt = Field(
        2,
        description="Kernels kept started and ready for new sessions (0: none); each is "
        "used by one session only, and the pool refills in the background.",
    )
    kernels: str = Field(
        "",
        description="The Jupyter kernelspecs offered besides Python's (comma-separated names: "
        "bash, deno, ir, java, any installed one, or a language's name such as r); empty: "
        "every one installed here (docs/languages.md).",
    )
    pool_sizes: str = Field(
        "",
        description="Warm pools for other languages: `language=size` pairs, comma-separated "
        "(e.g. `bash=1,r=1`); Python's is pool_size. None by default: they start on demand.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="One or more API keys, comma-separated; when set, every endpoint but "
        "GET /healthz and the web inspector's page and its files needs "
        "`Authorization: Bearer <key>` (or `token <key>`; on Jupyter's paths also "
        "`?token=<key>`).",
    )
    max_sessions_per_key: PositiveInt = Field(
        16, description="Live sessions one API key may hold (with API keys set)."
    )
    insecure: bool = Field(
        False, description="Allow listening on a non-loopback address without an API key."
    )
    session_ttl: float = Field(
        1800.0, ge=0, description="Seconds of inactivity before a session is culled (0: never)."
    )
    default_timeout: PositiveFloat = Field(30.0, description="Execution timeout when none asked.")
    max_timeout: PositiveFloat = Field(600.0, description="Cap on the timeout a caller may ask.")
    interrupt_grace: PositiveFloat = Field(
        0.5, description="Seconds an interrupted kernel has to come back before it is restarted."
    )
    interrupt_on_disconnect: bool = Field(
        True,
        description="When the client of POST /execute disconnects before the answer, interrupt "
        "its execution (or drop it from the session's queue); false: it runs to the end.",
    )
    kernel_start_timeout: PositiveFloat = Field(
        60.0, description="Seconds a new kernel has to answer kernel_info."
    )

    max_code_bytes: PositiveInt = Field(MIB, description="Largest `code` accepted (413 above).")
    output_limit: PositiveInt = Field(
        200_000,
        description="Characters of output kept per execution: half from the start, half the end.",
    )
    rich_output_limit: PositiveInt = Field(
        32 * MIB,
        description="Characters of images and other base64 display data kept per execution.",
    )
    text_limit: PositiveInt = Field(
        10_000, description="Characters of the LLM-facing `text` rendering (head and tail kept)."
    )
    max_message_bytes: PositiveInt | None = Field(
        None,
        description="Largest message read from a kernel; a larger one is refused before it is "
        "read (its output, and what followed it in that call, is lost, and the answer says "
        "so). Default: the largest message whose output could be kept (half of "
        "rich_output_limit, plus the text limits, plus room for the message's own fields).",
    )
    images_per_session: PositiveInt = Field(
        100, description="Images kept per session for their URLs (oldest dropped first)."
    )
    image_store_mb: PositiveInt = Field(
        32, description="MiB of images (base64) kept per session for their URLs."
    )
    max_file_mb: PositiveInt = Field(
        100, description="Largest file one upload (PUT /sessions/{id}/files/...) may be."
    )
    session_files_mb: PositiveInt = Field(
        1024,
        description="Total size an upload may bring a session's work directory to, where the "
        "work directory is not a filesystem of its own (where it is, its size caps it).",
    )
    full_output_mb: NonNegativeInt = Field(
        32,
        description="MiB of an execution's full text output kept in `.outputs/` of its work "
        "directory when the result had to cut it (0: none kept).",
    )
    sandbox: Literal["bubblewrap", "none"] = Field(
        "bubblewrap",
        description="How kernels are isolated; `none` runs them as plain processes (unsafe).",
    )
    sandbox_memory_mb: PositiveInt = Field(
        2048, description="Address space per kernel (RLIMIT_AS); past it: MemoryError."
    )
    sandbox_processes: PositiveInt = Field(
        64,
        description="Processes and threads per kernel (RLIMIT_NPROC of its own uid, and its "
        "pids cgroup).",
    )
    sandbox_file_mb: PositiveInt = Field(
        1024, description="Largest file a kernel may write (RLIMIT_FSIZE)."
    )
    sandbox_open_files: PositiveInt = Field(
        256, description="Open files per process of a kernel (RLIMIT_NOFILE)."
    )
    sandbox_cpus: NonNegativeFloat = Field(
        0.0,
        description="CPU time each kernel may use, in CPUs (a cgroup quota; 0: no quota, "
        "kernels share the CPUs equally).",
    )
    sandbox_tmp_mb: PositiveInt = Field(
        256, description="Size of each kernel's private /tmp (memory-backed)."
    )
    sandbox_work_dir_mb: int = Field(
        1024,
        ge=0,
        description="Size of each session's work directory, its own filesystem (0: no cap).",
    )
    sandbox_uid_base: int | None = Field(
        None,
        ge=1000,
        description="First of the uids given to kernels, one per live kernel; unset: a free "
        "range is claimed (from 210000 on), so that several services share a host.",
    )
    sandbox_uid_count: PositiveInt = Field(
        10000, description="How many uids kernels may use (the size of the claimed range)."
    )
    preload_modules: str = Field(
        "numpy,pandas,matplotlib.pyplot",
        description="Modules each kernel imports at start (comma-separated; empty for none).",
    )

    @model_validator(mode="after")
    def _timeouts_are_consistent(self) -> "Settings":
        if self.default_timeout > self.max_timeout:
            raise ValueError(
                "KERNEL_SERVICE_DEFAULT_TIMEOUT must not exceed KERNEL_SERVICE_MAX_TIMEOUT"
            )
        return self

    def language_pool_sizes(self) -> dict[str, int]:
        """`pool_sizes` read: language (or kernelspec) name → kernels kept ready."""
        sizes: dict[str, int] = {}
        for pair in filter(None, (p.strip() for p in self.pool_sizes.split(","))):
            name, _, size = pair.partition("=")
            if not name.strip() or not size.strip().isdigit():
                raise ValueError(
                    f"KERNEL_SERVICE_POOL_SIZES: {pair!r} is not `language=size` (e.g. bash=1)"
                )
            sizes[name.strip().lower()] = int(size)
        return sizes

    def offered_kernels(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.kernels.split(",") if name.strip())

    @model_validator(mode="after")
    def _pool_sizes_are_read(self) -> "Settings":
        self.language_pool_sizes()  # its ValueError names the setting
        return self

    def api_keys(self) -> list[str]:
        """The configured keys (never logged)."""
        if self.api_key is None:
            return []
        return [key.strip() for key in self.api_key.get_secret_value().split(",") if key.strip()]

    def message_limit(self) -> int:
        """The largest message read from a kernel (see `max_message_bytes`)."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        # a kept output holds at most half of each budget; text is counted in characters,
        # up to 4 bytes each in UTF-8 and 6 in escaped JSON
        return self.rich_output_limit // 2 + 6 * self.output_limit + MIB

    def effective_timeout(self, asked: float | None) -> float:
        """The timeout an execution gets: what was asked, or the default, capped by max_timeout."""
        return min(asked if asked is not None else self.default_timeout, self.max_timeout)
