"""The control channel between the supervisor and one worker process.

A message is a 4-byte big-endian length and that many bytes of UTF-8 JSON,
an object with an `op` key. A message may carry file descriptors (listening
sockets), attached with SCM_RIGHTS to its length prefix. The receiver reads
the prefix with `receive_fds`, so the descriptors arrive with their message.
Requests carry an `id` that the reply repeats.

Both ends are one AF_UNIX stream socketpair, created by the supervisor, so
only the two processes can speak on it.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

# A graph from the largest config file accepted (10 MiB) pickles to about
# 13 MiB, 18 MiB in base64; metrics snapshots of large configs fit as well.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_FDS = 256
_LENGTH = struct.Struct(">I")

Message = dict[str, Any]


class ChannelClosedError(Exception):
    """The peer closed the control channel (or it broke)."""


class Channel:
    """One end of a control channel, for use from one event loop.

    Create it with `await Channel.open(sock)`.
    """

    def __init__(self, stream: anyio.abc.UNIXSocketStream) -> None:
        self._stream = stream
        self._send_lock = anyio.Lock()
        self._receive_lock = anyio.Lock()

    def __repr__(self) -> str:
        raw = self._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        return f"<Channel fd={raw.fileno()}>"

    @classmethod
    async def open(cls, sock: socket.socket | int) -> Channel:
        """Wrap a connected AF_UNIX stream socket (or its descriptor)."""
        return cls(await anyio.abc.UNIXSocketStream.from_socket(sock))

    async def send(
        self, message: Mapping[str, Any], fds: list[int] | None = None
    ) -> None:
        """Send one message, with `fds` attached when given."""
        body = json.dumps(message, separators=(",", ":")).encode()
        prefix = _LENGTH.pack(len(body))
        try:
            async with self._send_lock:
                if fds:
                    await self._stream.send_fds(prefix, fds)
                    await self._stream.send(body)
                else:
                    await self._stream.send(prefix + body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
            raise ChannelClosedError(str(error)) from error

    async def receive(self) -> tuple[Message, list[int]]:
        """Receive one message and the descriptors attached to it."""
        try:
            async with self._receive_lock:
                prefix, fds = await self._stream.receive_fds(_LENGTH.size, MAX_FDS)
                if not prefix:
                    raise ChannelClosedError("control channel closed")
                prefix += await self._receive_exactly(_LENGTH.size - len(prefix))
                (length,) = _LENGTH.unpack(prefix)
                if length > MAX_MESSAGE_BYTES:
                    raise ChannelClosedError(f"control message of {length} bytes")
                body = await self._receive_exactly(length)
        except anyio.EndOfStream:
            raise ChannelClosedError("control channel closed") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
            raise ChannelClosedError(str(error)) from error
        message = json.loads(body)
        if not isinstance(message, dict) or "op" not in message:
            raise ChannelClosedError("malformed control message")
        return message, fds

    async def aclose(self) -> None:
        """Close this end; the peer's next receive raises ChannelClosedError."""
        await self._stream.aclose()

    async def _receive_exactly(self, count: int) -> bytes:
        chunks = []
        while count > 0:
            try:
                chunk = await self._stream.receive(min(count, 65536))
            except anyio.EndOfStream:
                raise ChannelClosedError("control channel closed") from None
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)
