"""The service's errors without a server: statuses found along the class hierarchy, messages
in no front door's words, and each front door's advice added by that front door."""

import re

import pytest

from kernel_service import errors
from kernel_service.api.errors import STATUS_OF, InvalidUpload, detail_of, status_of
from kernel_service.api.mcp import _message_of
from kernel_service.errors import (
    CodeTooLarge,
    FileChanged,
    FileNotFound,
    IsADirectory,
    NotAFile,
    ServiceError,
    SessionNotFound,
    TooManySessions,
    Unauthorized,
    WorkspaceFull,
)

# One of each error the service raises, as it raises them.
EVERY_ERROR: list[ServiceError] = [
    errors.SessionNotFound("s1"),
    errors.SessionExists("s1"),
    errors.TooManySessions(2),
    errors.TooManySessions(2, per_key=True),
    errors.Unauthorized(),
    errors.CodeTooLarge(1001, 1000),
    errors.KernelUnavailable("it did not answer within 30 s"),
    errors.ImageNotFound("s1", "3.png"),
    errors.StateFull("disk I/O error"),
    errors.InvalidFilePath("../x", "it has `..` in it"),
    errors.SymlinkRefused("a/b", "a"),
    errors.NotAFile("a", "is not a regular file"),
    errors.IsADirectory("a"),
    errors.FileNotFound("a"),
    errors.FileChanged("a", "Nothing was written."),
    errors.FileChanged("a", "It may be partly removed.", partly_done=True),
    errors.FileTooLarge(100 * 1024 * 1024),
    errors.WorkspaceFull("No space left on device"),
]
# What only a front door may say: routes, methods, HTTP headers.
FRONT_DOOR_WORDS = re.compile(r"\b(GET|POST|PUT|DELETE)\b|/sessions|Authorization|HTTP")


class _Unmapped(ServiceError):
    code = "unmapped"


class _GoneSession(SessionNotFound):
    """A subclass with no status of its own."""


class _MovedSession(SessionNotFound):
    """A subclass with a status of its own (given by the test)."""


def test_a_subclass_answers_with_its_bases_status() -> None:
    assert status_of(_GoneSession("s1")) == 404
    assert status_of(IsADirectory("a")) == status_of(NotAFile("a", "is odd")) == 400


def test_a_subclass_with_its_own_status_answers_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STATUS_OF, _MovedSession, 410)
    assert status_of(_MovedSession("s1")) == 410
    assert status_of(SessionNotFound("s1")) == 404


def test_an_error_without_a_status_anywhere_is_500() -> None:
    assert status_of(_Unmapped()) == 500
    assert status_of(ServiceError("?")) == 500


def test_every_error_the_service_raises_has_a_status() -> None:
    for error in [*EVERY_ERROR, InvalidUpload("the form has no file field")]:
        assert 400 <= status_of(error) < 500 or status_of(error) in (503, 507), error


@pytest.mark.parametrize("error", EVERY_ERROR, ids=lambda e: type(e).__name__)
def test_messages_are_in_no_front_doors_words(error: ServiceError) -> None:
    assert not FRONT_DOOR_WORDS.search(str(error)), str(error)


def test_http_adds_its_advice_after_the_message() -> None:
    gone = SessionNotFound("s1")
    assert detail_of(gone).startswith(str(gone))
    assert "POST /sessions" in detail_of(gone)
    assert "maximum of 2 sessions" in detail_of(TooManySessions(2))
    assert "DELETE /sessions/{id}" in detail_of(TooManySessions(2))
    assert "Authorization: Bearer" in detail_of(Unauthorized())
    assert "GET /sessions/{id}/files" in detail_of(FileNotFound("a"))
    assert "GET /sessions/{id}/files" in detail_of(IsADirectory("a"))
    assert "DELETE /sessions/{id}/files/{path}" in detail_of(WorkspaceFull("full"))
    # what is left is worth listing only when some of it was done
    assert "what is left" in detail_of(FileChanged("a", "Partly.", partly_done=True))
    assert detail_of(FileChanged("a", "Nothing was done.")) == str(
        FileChanged("a", "Nothing was done.")
    )
    assert detail_of(CodeTooLarge(1001, 1000)) == str(CodeTooLarge(1001, 1000))


def test_mcp_adds_its_own_advice_not_https() -> None:
    for error in EVERY_ERROR:
        assert not FRONT_DOOR_WORDS.search(_message_of(error)), _message_of(error)
    gone = _message_of(SessionNotFound("s1"))
    assert gone.startswith("Session 's1' does not exist")
    assert "without session_id" in gone
