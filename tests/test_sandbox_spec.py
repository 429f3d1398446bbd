"""The sandbox's one description and its two renderings: bubblewrap's arguments and the
operations the zygote's child applies. Pure: no root, no kernel (the attack suite,
test_sandbox.py, runs both launches for real)."""

import dataclasses
import inspect
import json
import os
import resource
from pathlib import Path

from kernel_service.kernel.programs import zygote
from kernel_service.kernel.sandbox_spec import (
    MOUNT_TYPES,
    NAMESPACES,
    PROC_MASKED,
    SHM_BYTES,
    Bind,
    Mask,
    Mount,
    ReadOnly,
    RemountReadOnly,
    SandboxLimits,
    SandboxSpec,
    Tmpfs,
    bwrap_mount,
    bwrap_options,
    prlimit_options,
    sandbox_spec,
    setpriv_options,
)

LIMITS = SandboxLimits(
    memory_bytes=1 << 30, processes=64, file_bytes=1 << 28, open_files=256, tmp_bytes=1 << 27
)


def spec(tmp_path: Path) -> SandboxSpec:
    fonts = tmp_path / "matplotlib"
    fonts.mkdir()
    (fonts / "fontlist-v390.json").write_text("{}")
    return sandbox_spec(
        LIMITS,
        211000,
        kernel_env={"LANG": "C.UTF-8", "MPLCONFIGDIR": str(fonts)},
        files_dir=tmp_path / "connections" / "k-1",
        work_dir=tmp_path / "work",
        read_only=(Path("/opt/python"), tmp_path / "startup.py"),
    )


def test_the_zygote_knows_every_operation_by_its_name_and_fields() -> None:
    assert set(zygote.MOUNTS) == {mount.op for mount in MOUNT_TYPES}
    for mount in MOUNT_TYPES:
        applied = list(inspect.signature(zygote.MOUNTS[mount.op]).parameters)[1:]  # root
        assert applied == [f.name for f in dataclasses.fields(mount)], mount.op


def test_both_renderings_cover_the_same_operations(tmp_path: Path) -> None:
    made = spec(tmp_path)
    # what the zygote receives is every mount, in order, with nothing lost
    sent = json.loads(json.dumps(made.to_json()))
    by_name = {mount.op: mount for mount in MOUNT_TYPES}
    received: list[Mount] = [by_name[m.pop("op")](**m) for m in sent["mounts"]]
    assert received == list(made.mounts)
    # bubblewrap's options are each mount's rendering, in the same order
    options = bwrap_options(made)
    rendered = [arg for mount in made.mounts for arg in bwrap_mount(mount)]
    start = options.index(rendered[0])
    assert options[start : start + len(rendered)] == rendered
    # (a mask or a knob renders to nothing only where the host's /proc has nothing there)
    assert all(
        bwrap_mount(m) or (isinstance(m, Mask | ReadOnly) and not os.path.exists(m.path))
        for m in made.mounts
    )
    # and every kind of operation is used
    assert {type(mount) for mount in made.mounts} == set(MOUNT_TYPES)


def test_namespaces_hostname_uid_environment_and_limits_reach_both(tmp_path: Path) -> None:
    made = spec(tmp_path)
    sent = made.to_json()
    options = bwrap_options(made)
    for namespace in NAMESPACES:
        assert namespace in zygote.CLONE_FLAGS
        assert any(option.startswith(f"--unshare-{namespace}") for option in options)
    assert sent["namespaces"] == list(NAMESPACES)
    assert options[options.index("--hostname") + 1] == sent["hostname"] == "sandbox"
    assert options[options.index("--chdir") + 1] == sent["cwd"] == "/workspace"
    assert [options[i + 1 : i + 3] for i, o in enumerate(options) if o == "--setenv"] == [
        [key, value] for key, value in sent["env"].items()
    ]
    assert sent["env"]["HOME"] == "/workspace" and sent["env"]["USER"] == "kernel211000"
    assert f"--reuid={sent['uid']}" in setpriv_options(made)
    assert f"--regid={sent['gid']}" in setpriv_options(made)
    # the zygote sets each limit by its RLIMIT_ name, prlimit by its option of that name
    for name, value in sent["rlimits"].items():
        assert hasattr(resource, f"RLIMIT_{name.upper()}")
        assert f"--{name}={value}" in prlimit_options(made)
    assert sent["rlimits"] == {
        "as": LIMITS.memory_bytes,
        "nproc": LIMITS.processes,
        "fsize": LIMITS.file_bytes,
        "nofile": LIMITS.open_files,
        "core": 0,
    }


def test_sizes_and_writable_paths_are_written_once(tmp_path: Path) -> None:
    made = spec(tmp_path)
    tmpfs = {m.path: m for m in made.mounts if isinstance(m, Tmpfs)}
    assert tmpfs["/dev/shm"].size == SHM_BYTES == 16 * 1024 * 1024
    assert tmpfs["/tmp"].size == LIMITS.tmp_bytes
    writable = [(m.source, m.path) for m in made.mounts if isinstance(m, Bind) and not m.read_only]
    assert writable == [
        (str(tmp_path / "connections" / "k-1"), str(tmp_path / "connections" / "k-1")),
        (str(tmp_path / "work"), "/workspace"),
    ]
    assert made.mounts[-1] == RemountReadOnly("/")  # last: the mount points exist by then


def test_a_mask_hides_a_directory_a_file_or_nothing(tmp_path: Path) -> None:
    """bubblewrap's rendering follows what is at the path (the zygote's child looks in the
    sandbox's own procfs instead: `_mask`, applied by the attack suite's launches)."""
    directory, file = tmp_path / "acpi", tmp_path / "keys"
    directory.mkdir()
    file.write_text("")
    assert bwrap_mount(Mask(str(directory))) == [
        "--perms", "0555", "--tmpfs", str(directory), "--remount-ro", str(directory),
    ]  # fmt: skip
    assert bwrap_mount(Mask(str(file))) == ["--ro-bind", "/dev/null", str(file)]
    assert bwrap_mount(Mask(str(tmp_path / "absent"))) == []
    assert bwrap_mount(ReadOnly(str(tmp_path / "absent"))) == []
    masked = {m.path for m in spec(tmp_path).mounts if isinstance(m, Mask)}
    assert masked == {f"/proc/{name}" for name in PROC_MASKED}
