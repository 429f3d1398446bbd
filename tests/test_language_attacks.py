"""The attack suite's core cases in every language: no network, no other session's files, a
fork bomb contained, memory bounded, a busy loop stopped — in Python, Bash, JavaScript
(Deno, which TypeScript shares), R and Java, each in its own sandbox, while the service
and a bystander session keep working. A language GET /kernelspecs says is not ready here
is skipped with its reason."""

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SANDBOXED, Server, running_server
from tests.test_languages import (
    BASH,
    JAVA,
    JAVASCRIPT,
    Lang,
    R,
    has_x,
    session_in,
    skip_unless_ready,
)

pytestmark = pytest.mark.skipif(
    not SANDBOXED, reason="the sandbox needs root and bubblewrap (CI has both)"
)

PRIVATE = "private-0b5e11e"  # what a session writes that no other may read
PUBLIC_ADDRESS = "1.1.1.1"


@dataclass(frozen=True)
class Attacks:
    """A language's code for each attack."""

    lang: Lang
    connect: Callable[[str, int], str]  # a TCP connection to host:port
    write: str  # writes PRIVATE to secret.txt in its work directory
    read: Callable[[str], str]  # prints the file at the path
    fork_bomb: str
    memory_bomb: str  # allocates far past the limits, keeping all it got


PYTHON = Lang(
    "python",
    "python3",
    set_x="x = 41",
    show_x="x",
    error="raise ValueError('boom')",
    expression="21 * 2",
    shown="42",
    busy="while True: pass",
    die="import os\nos.kill(os.getpid(), 9)",
)

ATTACKS = [
    Attacks(
        PYTHON,
        connect=lambda host, port: (
            f"import socket\nsocket.create_connection(({host!r}, {port}), timeout=3)"
        ),
        write=f"open('secret.txt', 'w').write({PRIVATE!r})",
        read=lambda path: f"print(open({path!r}).read())",
        # the workload's children sleep to hold their process slots while it forks more
        fork_bomb=(
            "import os, time\nn = 0\ntry:\n    while True:\n"
            "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print('fork failed after', n, e.errno)"
        ),
        memory_bomb="chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024**2))",
    ),
    Attacks(
        BASH,
        connect=lambda host, port: f"exec 3<>/dev/tcp/{host}/{port}",
        write=f"echo {PRIVATE} > secret.txt",
        read=lambda path: f"cat {path}",
        fork_bomb="bomb() { bomb | bomb & }; bomb",
        memory_bomb="",  # its own test: test_bash_memory_hogs_are_killed_not_the_kernel
    ),
    Attacks(
        JAVASCRIPT,
        connect=lambda host, port: (
            f'const conn = await Deno.connect({{ hostname: "{host}", port: {port} }});'
        ),
        write=f'Deno.writeTextFileSync("secret.txt", "{PRIVATE}")',
        read=lambda path: f'console.log(Deno.readTextFileSync("{path}"))',
        # processes rather than forks (a JavaScript program has none), until it may not
        fork_bomb=(
            "let n = 0;\ntry {\n  for (;;) {\n"
            '    new Deno.Command("sleep", { args: ["30"] }).spawn();\n    n++;\n  }\n'
            '} catch (e) {\n  console.log("spawn failed after", n, String(e));\n}'
        ),
        memory_bomb=(
            "const chunks = [];\nfor (;;) chunks.push(new Uint8Array(64 * 1024 * 1024).fill(1));"
        ),
    ),
    Attacks(
        R,
        connect=lambda host, port: (
            f'con <- socketConnection("{host}", {port}, blocking = TRUE, timeout = 3)'
        ),
        write=f'writeLines("{PRIVATE}", "secret.txt")',
        read=lambda path: f'cat(readLines("{path}"))',
        fork_bomb=(
            "n <- 0\ntryCatch(repeat { parallel::mcparallel(Sys.sleep(30)); n <- n + 1 },\n"
            '  error = function(e) cat("fork failed after", n, conditionMessage(e)))'
        ),
        memory_bomb="chunks <- list()\nrepeat chunks[[length(chunks) + 1]] <- numeric(8 * 1024^2)",
    ),
    Attacks(
        JAVA,
        connect=lambda host, port: f'new java.net.Socket("{host}", {port});',
        write=(
            f'java.nio.file.Files.writeString(java.nio.file.Path.of("secret.txt"), "{PRIVATE}");'
        ),
        read=lambda path: (
            f'System.out.println(java.nio.file.Files.readString(java.nio.file.Path.of("{path}")));'
        ),
        fork_bomb=(
            "int n = 0;\ntry {\n  for (;;) {\n"
            '    new ProcessBuilder("sleep", "30").start();\n    n++;\n  }\n'
            '} catch (Throwable e) {\n  System.out.println("spawn failed after " + n + " " + e);\n}'
        ),
        memory_bomb=(
            "java.util.List<byte[]> chunks = new java.util.ArrayList<>();\n"
            "for (;;) chunks.add(new byte[64 * 1024 * 1024]);"
        ),
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sandboxed server for every language. A kernel's RLIMIT_AS of 1 GiB makes its
    memory cgroup (RLIMIT_AS, /tmp and room besides) smaller than three programs of 600 MiB
    each, as the Bash memory attack needs."""
    with running_server(tmp_path_factory.mktemp("language-attacks"), sandbox_memory_mb=1024) as s:
        yield s


@pytest.fixture(scope="module")
def bystander(server: Server) -> Iterator[str]:
    """A Python session that must come through every attack with its state intact."""
    session_id = server.new_session("bystander")
    server.execute("precious = 'still here'", session_id)
    yield session_id
    assert server.execute("precious", session_id)["result"] == "'still here'"
    server.client.delete(f"/sessions/{session_id}")


@pytest.fixture(params=ATTACKS, ids=[attacks.lang.name for attacks in ATTACKS])
def attacks(request: pytest.FixtureRequest, server: Server) -> Attacks:
    chosen: Attacks = request.param
    skip_unless_ready(server, chosen.lang.name)
    return chosen


@pytest.fixture
def attacker(server: Server, attacks: Attacks, bystander: str) -> Iterator[str]:
    """A session in the attack's language, with x set; the service and the bystander are
    checked once it is gone."""
    with session_in(server, attacks.lang.name) as session_id:
        assert server.execute(attacks.lang.set_x, session_id)["status"] == "ok"
        yield session_id
    assert server.client.get("/healthz").status_code == 200
    assert server.execute("precious", bystander)["result"] == "'still here'"


def run(server: Server, session: str, code: str, **extra: object) -> dict[str, Any]:
    return server.execute(code, session, **extra)


def assert_honest(server: Server, attacks: Attacks, session: str, answer: dict[str, Any]) -> None:
    """The session works after `answer`, and its state is what `answer` said it is."""
    after = run(server, session, attacks.lang.show_x)
    assert has_x(after) is not answer["state_lost"], (answer, after)
    if answer["state_lost"]:
        assert run(server, session, attacks.lang.set_x)["status"] == "ok"
    assert has_x(run(server, session, attacks.lang.show_x))


def test_no_network(server: Server, attacks: Attacks, attacker: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for host, target_port in ((PUBLIC_ADDRESS, 80), ("127.0.0.1", port)):
            result = run(server, attacker, attacks.connect(host, target_port), timeout=20)
            assert result["status"] == "error", (host, result)
            words = result["text"].lower()
            # the sandbox's empty network namespace refuses it, not the runtime's own checks
            assert any(
                said in words for said in ("unreachable", "refused", "cannot open", "no route")
            ), (host, result["text"])
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's port
    assert_honest(server, attacks, attacker, {"state_lost": False})


def test_another_sessions_files_cannot_be_read(
    server: Server, attacks: Attacks, attacker: str
) -> None:
    with session_in(server, attacks.lang.name) as owner:
        assert run(server, owner, attacks.write)["status"] == "ok"
        owner_dir = server.settings.work_dir.resolve() / owner
        assert (owner_dir / "secret.txt").read_text().strip() == PRIVATE
        assert PRIVATE in run(server, owner, attacks.read("/workspace/secret.txt"))["stdout"]
        # /workspace is each session's own; the owner's work dir on the host is not there
        for path in ("/workspace/secret.txt", str(owner_dir / "secret.txt")):
            stolen = run(server, attacker, attacks.read(path))
            assert stolen["status"] == "error", (path, stolen)
            assert PRIVATE not in stolen["text"], path
    # nor a Python session's, from another language
    python_dir = server.settings.work_dir.resolve() / "bystander"
    (python_dir / "mine.txt").write_text(PRIVATE)
    stolen = run(server, attacker, attacks.read(str(python_dir / "mine.txt")))
    assert stolen["status"] == "error" and PRIVATE not in stolen["text"], stolen


def test_a_fork_bomb_is_contained(
    server: Server, attacks: Attacks, attacker: str, bystander: str
) -> None:
    started = time.monotonic()
    bombed = run(server, attacker, attacks.fork_bomb, timeout=20)
    contained_s = time.monotonic() - started
    assert bombed["status"] in ("ok", "error", "timeout"), bombed
    assert contained_s < 30, f"contained in {contained_s:.1f} s"
    # the service and the other session go on while the bomb's processes live
    started = time.monotonic()
    assert server.client.get("/healthz").status_code == 200
    # responsive, however busy the machine is (a bound for a service stuck, not a speed)
    assert time.monotonic() - started < 10.0
    assert server.execute("precious", bystander)["result"] == "'still here'"
    # within its pids cgroup, whatever it printed
    limit = server.client.get("/healthz").json()["isolation"].get("pids_cgroup_max")
    counted = re.search(r"failed after (\d+)", bombed["stdout"])
    if counted and limit:
        assert int(counted[1]) <= limit, bombed["stdout"]
    assert_honest(server, attacks, attacker, bombed)


def test_a_memory_bomb_is_stopped(server: Server, attacks: Attacks, attacker: str) -> None:
    if attacks.lang is BASH:
        pytest.skip("Bash's: test_bash_memory_hogs_are_killed_not_the_kernel")
    bombed = run(server, attacker, attacks.memory_bomb, timeout=120)
    assert bombed["status"] == "error", bombed
    error = bombed["error"]
    if bombed["state_lost"]:
        # the memory cgroup's OOM killer ended the kernel, and the answer says so
        assert error["ename"] == "KernelDied", error
        assert "out of memory" in error["evalue"].lower() or "oom" in error["evalue"].lower()
    else:
        # the runtime refused the allocation (RLIMIT_AS, its own heap limit)
        words = f"{error['ename']} {error['evalue']}".lower()
        assert any(
            said in words
            for said in ("memoryerror", "outofmemory", "cannot allocate", "allocation failed")
        ), error
    assert server.client.get("/healthz").status_code == 200
    assert_honest(server, attacks, attacker, bombed)


def test_bash_memory_hogs_are_killed_not_the_kernel(server: Server, bystander: str) -> None:
    skip_unless_ready(server, "bash")
    cgroup_mb = server.client.get("/healthz").json()["isolation"].get("memory_cgroup_mb")
    if not cgroup_mb:
        pytest.skip("no memory cgroup here: RLIMIT_AS alone bounds each process")
    assert cgroup_mb < 3 * 600, cgroup_mb  # what the attack needs of the server's settings
    with session_in(server, "bash") as session:
        run(server, session, BASH.set_x)
        # the memory cgroup: three programs, each under RLIMIT_AS, together past it; the OOM
        # killer ends one or more of them (137: SIGKILL), not the kernel. Each tail keeps its
        # 600 MiB until all three are full or one has ended (the workload polls files for
        # that: its only sleeps), so they are in memory together however they are scheduled:
        # left to finish on their own, they ran one after another on CI and were never killed.
        many = run(
            server,
            session,
            "rm -f full? ended? release; for i in 1 2 3; do ( { head -c 600M /dev/zero"
            " && touch full$i && until [ -e release ]; do sleep 0.1; done; } | tail > /dev/null;"
            ' echo "tail $i: ${PIPESTATUS[1]}"; touch ended$i ) & done;'
            " until [ -e full1 -a -e full2 -a -e full3 ] || compgen -G 'ended?' > /dev/null;"
            " do sleep 0.1; done; touch release; wait",
            timeout=60,
        )
        statuses = [
            line.split(": ")[1] for line in many["stdout"].splitlines() if line.startswith("tail ")
        ]
        assert len(statuses) == 3, many["stdout"]
        assert "137" in statuses, statuses
        assert not many["state_lost"], many
        assert has_x(run(server, session, BASH.show_x))  # the kernel (and its shell) survived
    assert server.client.get("/healthz").status_code == 200
    assert server.execute("precious", bystander)["result"] == "'still here'"


def test_a_busy_loop_times_out(server: Server, attacks: Attacks, attacker: str) -> None:
    stopped = run(server, attacker, attacks.lang.busy, timeout=2)
    assert stopped["status"] == "timeout", stopped
    assert_honest(server, attacks, attacker, stopped)


def test_the_work_dirs_are_apart(server: Server, attacks: Attacks, attacker: str) -> None:
    """What a session writes lands in its own work directory and no other."""
    assert run(server, attacker, attacks.write)["status"] == "ok"
    root = server.settings.work_dir.resolve()
    holders = sorted(p.parent.name for p in root.glob("*/secret.txt"))
    assert holders == [attacker]
    assert Path(root / attacker / "secret.txt").read_text().strip() == PRIVATE
