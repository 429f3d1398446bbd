"""The service's ZMTP sockets against libzmq's (pyzmq, as a kernel binds them): messages of
every size arrive whole and in order, however the reads split them, and one over the limit
is refused without losing the connection for the next."""

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from kernel_service.kernel.wire import KernelSocket, SocketType

LIMIT = 4 * 1024 * 1024
SMALL_LIMIT = 64 * 1024


async def until(condition: "asyncio.Event", seconds: float = 30) -> None:
    await asyncio.wait_for(condition.wait(), seconds)


@contextlib.contextmanager
def kernel_end(tmp_path: Path, kind: int) -> Iterator[tuple[zmq.asyncio.Socket, Path]]:
    """A socket bound as a kernel binds its own (libzmq's, through pyzmq), and its path."""
    context = zmq.asyncio.Context()
    peer = context.socket(kind)
    path = tmp_path / "kernel"
    peer.bind(f"ipc://{path}")
    try:
        yield peer, path
    finally:
        peer.close(linger=0)
        context.term()


@pytest.mark.parametrize("socket_type", ["DEALER", "SUB"])
def test_messages_arrive_whole_whatever_their_size(tmp_path: Path, socket_type: str) -> None:
    asyncio.run(messages_arrive_whole(tmp_path, socket_type))


async def messages_arrive_whole(tmp_path: Path, socket_type: str) -> None:
    with kernel_end(tmp_path, zmq.ROUTER if socket_type == "DEALER" else zmq.XPUB) as (
        peer,
        path,
    ):
        await arrive_whole(peer, path, socket_type)


async def arrive_whole(peer: zmq.asyncio.Socket, path: Path, socket_type: str) -> None:
    received: list[list[bytes]] = []
    refusals: list[str] = []
    arrived = asyncio.Event()
    expected: list[list[bytes]] = []

    def on_message(frames: list[bytes]) -> None:
        received.append(frames)
        if len(received) >= len(expected):
            arrived.set()

    kind: SocketType = "DEALER" if socket_type == "DEALER" else "SUB"
    ours = KernelSocket(str(path), kind, LIMIT, on_message, refusals.append)
    ours.start()
    try:
        identity = b""
        if socket_type == "DEALER":
            ours.send([b"hello"])
            identity, hello = await asyncio.wait_for(peer.recv_multipart(), 30)
            assert hello == b"hello"
        else:  # a SUB socket is connected once its subscription reaches the publisher
            subscription = await asyncio.wait_for(peer.recv(), 30)  # what XPUB shows of it
            assert subscription == b"\x01"  # to every topic
        expected.extend(
            [
                [b"<IDS|MSG>", b"", b"{}", b"{}", b"{}", b"{}"],
                [b"x" * 255, b"y" * 256],  # the short and the long frame head
                [bytes(range(256)) * 4096, b"tail"],  # 1 MiB: split across many reads
                *([b"small", str(i).encode()] for i in range(200)),  # many in one read
            ]
        )
        for frames in expected:
            await peer.send_multipart([identity, *frames] if identity else frames)
        await until(arrived)
        assert received == expected
        assert refusals == []
    finally:
        ours.close()


def test_a_message_over_the_limit_is_refused_and_the_next_arrives(tmp_path: Path) -> None:
    asyncio.run(over_the_limit(tmp_path))


async def over_the_limit(tmp_path: Path) -> None:
    with kernel_end(tmp_path, zmq.ROUTER) as (peer, path):
        await refused_then_next(peer, path)


async def refused_then_next(peer: zmq.asyncio.Socket, path: Path) -> None:
    received: list[list[bytes]] = []
    refusals: list[str] = []
    arrived = asyncio.Event()

    def on_message(frames: list[bytes]) -> None:
        received.append(frames)
        arrived.set()

    refused = asyncio.Event()

    def on_refused(reason: str) -> None:
        refusals.append(reason)
        refused.set()

    ours = KernelSocket(str(path), "DEALER", LIMIT, on_message, on_refused)
    ours.start()
    try:
        ours.send([b"hello"])
        identity, _ = await asyncio.wait_for(peer.recv_multipart(), 30)
        await peer.send_multipart([identity, b"a" * LIMIT, b"b"])
        await until(refused)
        # sent once the refusal is known: it waits for the next connection, and goes there
        ours.send([b"again"])
        identity, frame = await asyncio.wait_for(peer.recv_multipart(), 30)
        assert frame == b"again"
        await peer.send_multipart([identity, b"after"])
        await until(arrived)
        assert received == [[b"after"]]
        assert "more than" in refusals[0]
    finally:
        ours.close()


# A send made while a refusal is being told (as a kernel's `_on_refused` may cause) goes to
# the next connection, not the one aborted right after (its answer would go nowhere).
def test_a_send_made_as_the_refusal_is_told_goes_to_the_next_connection(tmp_path: Path) -> None:
    asyncio.run(send_on_refusal(tmp_path))


async def send_on_refusal(tmp_path: Path) -> None:
    with kernel_end(tmp_path, zmq.ROUTER) as (peer, path):
        await sent_on_refusal(peer, path)


async def sent_on_refusal(peer: zmq.asyncio.Socket, path: Path) -> None:
    ours: KernelSocket
    answered = asyncio.Event()
    received: list[list[bytes]] = []

    def on_message(frames: list[bytes]) -> None:
        received.append(frames)
        answered.set()

    def on_refused(reason: str) -> None:
        ours.send([b"again"])

    ours = KernelSocket(str(path), "DEALER", SMALL_LIMIT, on_message, on_refused)
    ours.start()
    try:
        ours.send([b"hello"])
        identity, _ = await asyncio.wait_for(peer.recv_multipart(), 30)
        await peer.send_multipart([identity, b"a" * (SMALL_LIMIT + 1)])
        identity, frame = await asyncio.wait_for(peer.recv_multipart(), 30)
        assert frame == b"again"
        await peer.send_multipart([identity, b"answer"])  # as a kernel answers a request
        await asyncio.wait_for(answered.wait(), 10)
        assert received == [[b"answer"]]
    finally:
        ours.close()
