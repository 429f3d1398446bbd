"""The service's own faults, as typed exceptions. The API maps each to one HTTP status.

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
            "or never created. Create a new one (POST /sessions, or POST /execute without "
            "session_id); variables from the old session are gone."
        )
        self.session_id = session_id


class SessionExists(ServiceError):
    code = "session_exists"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id!r} already exists; choose another id.")


class TooManySessions(ServiceError):
    code = "too_many_sessions"

    def __init__(self, limit: int, per_key: bool = False) -> None:
        whose = "this API key already has its" if per_key else "the service already runs its"
        super().__init__(
            f"Too many sessions: {whose} maximum of {limit} sessions. Delete a session you "
            "no longer need (DELETE /sessions/{id}) or try again later."
        )


class Unauthorized(ServiceError):
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("Missing or wrong API key: send the header `Authorization: Bearer <key>`.")


class CodeTooLarge(ServiceError):
    code = "code_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"The code is {size:,} bytes; the limit is {limit:,} bytes. Send smaller cells, "
            "or put data in files instead of in the source."
        )


class KernelUnavailable(ServiceError):
    code = "kernel_start_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"A kernel could not be started: {reason}")


class ImageNotFound(ServiceError):
    code = "image_not_found"

    def __init__(self, session_id: str, image_id: str) -> None:
        super().__init__(
            f"Session {session_id!r} has no image {image_id!r} (older images are dropped "
            "once a session holds many)."
        )


class StateFull(ServiceError):
    code = "state_storage_full"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"The service cannot record this, so it did not do it: its state storage is full "
            f"or failing ({detail}). Try again once there is room."
        )


# ---------------------------------------------------------------- files of a work directory


class InvalidFilePath(ServiceError):
    """A path the files API refuses before touching anything: `..`, absolute, NUL..."""

    code = "invalid_file_path"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"Invalid file path {path!r}: {reason}. Paths are relative to the session's work "
            "directory (the code's current directory), e.g. `data.csv` or `results/out.csv`."
        )


class SymlinkRefused(ServiceError):
    """The path goes through a symbolic link: the files API never follows one."""

    code = "symlink_refused"

    def __init__(self, path: str, link: str) -> None:
        super().__init__(
            f"Refused {path!r}: {link!r} is a symbolic link, and the files API does not follow "
            "links (it could lead out of the work directory). Use the path of the file itself."
        )


class NotAFile(ServiceError):
    code = "not_a_file"

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path!r} {what}.")


class FileNotFound(ServiceError):
    code = "file_not_found"

    def __init__(self, path: str) -> None:
        super().__init__(
            f"No file {path!r} in the session's work directory (GET /sessions/{{id}}/files "
            "lists them)."
        )


class FileChanged(ServiceError):
    """The session's code changed the path while the service worked on it (a race)."""

    code = "file_changed"

    def __init__(self, path: str, outcome: str) -> None:
        super().__init__(
            f"{path!r} changed while the service was at it: the session's code is changing "
            f"it at the same time. {outcome} Try again once the code leaves it alone."
        )


class FileTooLarge(ServiceError):
    code = "file_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The file is larger than the {limit // (1024 * 1024):,} MiB an upload may be "
            "(KERNEL_SERVICE_MAX_FILE_MB). Nothing was written."
        )


class WorkspaceFull(ServiceError):
    code = "workspace_full"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"The session's work directory has no room for this file ({detail}). Nothing was "
            "written: delete files you no longer need (DELETE /sessions/{id}/files/{path}) "
            "and try again."
        )


class InvalidUpload(ServiceError):
    code = "invalid_request"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid upload: {reason}.")
