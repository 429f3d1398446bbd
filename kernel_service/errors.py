"""The service's own faults, as typed exceptions raised by sessions, the work directory and
the store.

Each says what went wrong, and what any caller can do about it, in words of no front door:
the fields it was made with are kept for a front door to add its own next step (an HTTP
route, a tool's argument). `kernel_service.api.errors` maps each to one HTTP status, along
the class hierarchy, and adds HTTP's advice; `kernel_service.api.mcp` adds the tool's.

A failure of the *user's* code is never one of these: it is data in an ExecutionResult.
"""


class ServiceError(Exception):
    """Base of every fault the service reports to a caller; `code` is machine-readable."""

    code = "service_error"


class SessionNotFound(ServiceError):
    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"Session {session_id!r} does not exist: it was deleted, culled after being idle, "
            "or never created, and its variables are gone."
        )
        self.session_id = session_id


class SessionLostWithCell(SessionNotFound):
    code = "session_lost_with_cell"

    def __init__(self, session_id: str, tag: str) -> None:
        ServiceError.__init__(
            self,
            f"Session {session_id!r} was lost with its cell {tag!r}: the cell's state was "
            "lost (a new volume, or its state directory removed), and with it the session, its "
            "variables and files.",
        )
        self.session_id = session_id


class SessionOfAnotherCell(SessionNotFound):
    code = "misdirected"

    def __init__(self, session_id: str, its_tag: str, this_tag: str) -> None:
        ServiceError.__init__(
            self,
            f"Session {session_id[:128]!r} is held by cell {its_tag!r}, not by this one "
            f"({this_tag!r}): send requests to the cluster's proxy, which routes by that tag. "
            "A proxy sends here what it could not route: a POST /execute whose session_id "
            "comes after the first 64 KiB of its body; put session_id first, or use "
            "POST /sessions/{id}/execute.",
        )
        self.session_id = session_id


class WrongCell(ServiceError):
    """A session id chosen for a cell of a cluster that does not start with its tag."""

    code = "wrong_cell"

    def __init__(self, session_id: str, tag: str) -> None:
        super().__init__(
            f"Session id {session_id[:128]!r} does not start with this cell's tag {tag!r}: in a "
            "cluster, the first 4 characters of a session id name the cell that holds it. "
            "Leave the id out to be given one, or start it with the tag of the cell it is for."
        )
        self.session_id = session_id
        self.tag = tag


class Draining(ServiceError):
    code = "draining"

    def __init__(self) -> None:
        super().__init__(
            "This service is draining (about to stop or move): it makes no new sessions; its "
            "sessions go on. Try again later, or (in a cluster) through its proxy, which sends "
            "new sessions to a cell that takes them."
        )


class SessionExists(ServiceError):
    code = "session_exists"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id!r} already exists; choose another id.")
        self.session_id = session_id


class TooManySessions(ServiceError):
    code = "too_many_sessions"

    def __init__(self, limit: int, per_key: bool = False) -> None:
        whose = "this API key already has its" if per_key else "the service already runs its"
        super().__init__(f"Too many sessions: {whose} maximum of {limit} sessions.")
        self.limit = limit
        self.per_key = per_key


class Unauthorized(ServiceError):
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Missing or wrong API key.")


class CodeTooLarge(ServiceError):
    code = "code_too_large"

    def __init__(self, size: int, limit: int, what: str = "code") -> None:
        """`what`: the code, or the request that carries it."""
        super().__init__(
            f"The {what} is {size:,} bytes; the limit is {limit:,} bytes. Send smaller cells, "
            "or put data in files instead of in the source."
        )
        self.size = size
        self.limit = limit


class KernelUnavailable(ServiceError):
    code = "kernel_start_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"A kernel could not be started: {reason}")
        self.reason = reason


class UnknownLanguage(ServiceError):
    code = "unknown_language"

    def __init__(self, asked: str, offered: list[str]) -> None:
        super().__init__(
            f"No language or kernel {asked[:64]!r} here: choose one of "
            f"{', '.join(offered)} (Python when none is given)."
        )
        self.asked = asked
        self.offered = offered


class LanguageUnavailable(ServiceError):
    code = "language_unavailable"

    def __init__(self, language: str, problem: str) -> None:
        super().__init__(
            f"{language!r} cannot run on this service: {problem}. An operator can install it; "
            "until then, use another language."
        )
        self.language = language
        self.problem = problem


class LanguageMismatch(ServiceError):
    code = "language_mismatch"

    def __init__(self, session_id: str, has: str, asked: str) -> None:
        super().__init__(
            f"Session {session_id!r} runs {has}, not {asked[:64]}: a session keeps the "
            f"language it was made with. Leave `language` out to run {has} in it, or use "
            f"another session for {asked[:64]}."
        )
        self.session_id = session_id


class ImageNotFound(ServiceError):
    code = "image_not_found"

    def __init__(self, session_id: str, image_id: str) -> None:
        super().__init__(
            f"Session {session_id!r} has no image {image_id!r} (older images are dropped "
            "once a session holds many)."
        )
        self.session_id = session_id
        self.image_id = image_id


class StateFull(ServiceError):
    code = "state_storage_full"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"The service cannot record this, so it did not do it: its state storage is full "
            f"or failing ({detail}). Try again once there is room."
        )
        self.detail = detail


# ---------------------------------------------------------------- files of a work directory


class InvalidFilePath(ServiceError):
    """A path the files API refuses before touching anything: `..`, absolute, NUL..."""

    code = "invalid_file_path"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"Invalid file path {path!r}: {reason}. Paths are relative to the session's work "
            "directory (the code's current directory), e.g. `data.csv` or `results/out.csv`."
        )
        self.path = path
        self.reason = reason


class SymlinkRefused(ServiceError):
    """The path goes through a symbolic link: the files API never follows one."""

    code = "symlink_refused"

    def __init__(self, path: str, link: str) -> None:
        super().__init__(
            f"Refused {path!r}: {link!r} is a symbolic link, and the files API does not follow "
            "links (it could lead out of the work directory). Use the path of the file itself."
        )
        self.path = path
        self.link = link


class NotAFile(ServiceError):
    """Something other than a single regular file where the files API wants one."""

    code = "not_a_file"

    def __init__(self, path: str, what: str) -> None:
        """`what` completes the sentence: `is not a regular file`."""
        super().__init__(f"{path!r} {what}.")
        self.path = path
        self.what = what


class IsADirectory(NotAFile):
    """A directory where the files API wants a file (to read it, or to write over it)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "is a directory")


class FileNotFound(ServiceError):
    code = "file_not_found"

    def __init__(self, path: str) -> None:
        super().__init__(f"No file {path!r} in the session's work directory.")
        self.path = path


class FileChanged(ServiceError):
    """The session's code changed the path while the service worked on it (a race)."""

    code = "file_changed"

    def __init__(self, path: str, outcome: str, *, partly_done: bool = False) -> None:
        """`outcome`: what the service did of it, as a sentence; `partly_done` when some of
        it was done (a removal that went part of the way)."""
        super().__init__(
            f"{path!r} changed while the service was at it: the session's code is changing "
            f"it at the same time. {outcome} Try again once the code leaves it alone."
        )
        self.path = path
        self.partly_done = partly_done


class FileTooLarge(ServiceError):
    code = "file_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The file is larger than the {limit // (1024 * 1024):,} MiB an upload may be "
            "(KERNEL_SERVICE_MAX_FILE_MB). Nothing was written."
        )
        self.limit = limit


class WorkspaceFull(ServiceError):
    code = "workspace_full"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"The session's work directory has no room for this file ({detail}). Nothing was "
            "written."
        )
        self.detail = detail
