"""Path checks of the files API alone (nothing is touched): which paths split into names
under the work directory, which are refused and why, and the URLs files are served at."""

import pytest

from kernel_service.errors import InvalidFilePath
from kernel_service.workdir.listing import file_url
from kernel_service.workdir.paths import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    split_path,
)


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("data.csv", ["data.csv"]),
        ("results/out.csv", ["results", "out.csv"]),
        (".hidden/..dots.../x", [".hidden", "..dots...", "x"]),
        ("名前/données.txt", ["名前", "données.txt"]),
        ("with space/a\\b", ["with space", "a\\b"]),  # a backslash is a character of a name
        ("/".join(["d"] * MAX_DEPTH), ["d"] * MAX_DEPTH),
        ("n" * MAX_NAME_BYTES, ["n" * MAX_NAME_BYTES]),
    ],
)
def test_relative_paths_split_into_their_names(path: str, names: list[str]) -> None:
    assert split_path(path) == names


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("a\x00b", "NUL"),
        ("..", "`..`"),
        ("a/../../etc", "`..`"),
        ("./a", "`.`"),
        ("a//b", "empty name"),
        ("a/", "empty name"),
        ("\udcff", "UTF-8"),  # a lone surrogate: no file name on disk is that
        ("/".join(["d"] * (MAX_DEPTH + 1)), f"more than {MAX_DEPTH} levels"),
        ("n" * (MAX_NAME_BYTES + 1), f"longer than {MAX_NAME_BYTES} bytes"),
        ("é" * (MAX_NAME_BYTES // 2 + 1), f"longer than {MAX_NAME_BYTES} bytes"),  # bytes count
        ("/".join(["n" * 200] * 21), f"longer than {MAX_PATH_BYTES} bytes"),
    ],
)
def test_paths_outside_or_malformed_are_refused_with_the_reason(path: str, reason: str) -> None:
    with pytest.raises(InvalidFilePath, match=reason):
        split_path(path)


def test_file_urls_quote_each_name_and_keep_the_slashes() -> None:
    assert file_url("s1", "out.csv") == "/sessions/s1/files/out.csv"
    assert file_url("s1", "a b/c#d?.txt") == "/sessions/s1/files/a%20b/c%23d%3F.txt"
    assert file_url("s1", "名.txt") == "/sessions/s1/files/%E5%90%8D.txt"
