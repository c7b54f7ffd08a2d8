"""Tests of the supervisor-worker control channel over a real socketpair."""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import AsyncIterator

import anyio
import pytest

from pgproxy.server.control import MAX_MESSAGE_BYTES, Channel, ChannelClosedError
from pgproxy.server.worker import encode_config, oversized_message, payload_fits

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    raw = right.dup()
    sender, receiver = await Channel.open(left), await Channel.open(right)
    yield sender, receiver, raw
    await sender.aclose()
    await receiver.aclose()
    raw.close()


async def test_messages_in_order(pair: tuple[Channel, Channel, socket.socket]) -> None:
    sender, receiver, _ = pair

    async with anyio.create_task_group() as group:
        # The second message is larger than a socket buffer, so it is sent
        # while the receiver reads.
        group.start_soon(sender.send, {"op": "a", "n": 1})
        group.start_soon(sender.send, {"op": "b", "text": "é" * 100_000})
        first = await receiver.receive()
        message, fds = await receiver.receive()

    assert first == ({"op": "a", "n": 1}, [])
    assert message["text"] == "é" * 100_000
    assert fds == []


async def test_descriptors_travel_with_message(
    pair: tuple[Channel, Channel, socket.socket],
) -> None:
    sender, receiver, _ = pair
    read_end, write_end = os.pipe()

    await sender.send({"op": "first"})
    await sender.send({"op": "with-fd"}, [read_end])
    await sender.send({"op": "last"})

    assert (await receiver.receive())[1] == []
    message, fds = await receiver.receive()
    assert message == {"op": "with-fd"}
    assert len(fds) == 1
    os.write(write_end, b"ok")
    assert os.read(fds[0], 2) == b"ok"
    assert (await receiver.receive())[1] == []
    for fd in (read_end, write_end, fds[0]):
        os.close(fd)


async def test_closed_peer_raises(pair: tuple[Channel, Channel, socket.socket]) -> None:
    sender, receiver, raw = pair
    await sender.aclose()
    raw.close()

    with pytest.raises(ChannelClosedError):
        await receiver.receive()


async def test_oversized_length_rejected() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.open(right)
    left.sendall(struct.pack(">I", 1 << 31))

    with pytest.raises(ChannelClosedError):
        await channel.receive()
    left.close()
    await channel.aclose()


async def test_message_without_op_rejected() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await Channel.open(right)
    body = b'{"x": 1}'
    left.sendall(struct.pack(">I", len(body)) + body)

    with pytest.raises(ChannelClosedError):
        await channel.receive()
    left.close()
    await channel.aclose()


async def test_largest_config_payload_travels(
    pair: tuple[Channel, Channel, socket.socket],
) -> None:
    # The largest config file accepted (10 MiB) gives a pickled graph of
    # about 13 MiB; with margin, 20 MiB of payload must fit in one message.
    payload = os.urandom(20 * 2**20)
    assert payload_fits(payload)
    sender, receiver, _ = pair
    async with anyio.create_task_group() as group:
        group.start_soon(
            sender.send, {"op": "reload", "config": encode_config(payload)}
        )
        message, _ = await receiver.receive()
    assert base64.b64decode(message["config"]) == payload


def test_payload_beyond_the_limit_is_refused_before_sending() -> None:
    assert not payload_fits(b"\0" * (MAX_MESSAGE_BYTES // 4 * 3))
    text = oversized_message("big.toml", b"\0" * (3 * 2**20))
    assert text.startswith("big.toml builds a graph of 3.0 MiB")
