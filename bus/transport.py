"""ZeroMQ transport driven directly by the asyncio loop.

Each `Channel` wraps one plain (non-asyncio) zmq socket owned by one event loop.
The loop watches the socket's ZMQ_FD with `add_reader`; a readable callback drains
every ready message into either a per-channel callback (`on_frames`, the fast
path the actor layer uses: no future per message) or a bounded inbox read with
`await recv()`. ZMQ_FD is edge-like: after any operation on the socket the state
must be re-read from ZMQ_EVENTS, so every send re-checks for input or room that
arrived meanwhile, and a sender looks once more before it waits for room.

Rules kept here: addresses are `inproc://`, `ipc://` or `tcp://`; one
`zmq.Context` per process (`new_context`); finite high-water marks; `LINGER=0`;
every socket is closed (by `Channel.close` / `Transport.close`) before the
context terminates. Frames of at least `OOB_THRESHOLD` bytes are sent without a
copy. A channel is used only from the loop that created it.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from greenroom.bus.codec import OOB_THRESHOLD
from greenroom.bus.security import ClientKeys, SecurityError, SocketSecurity, is_loopback

DEFAULT_HWM = 1024
SCHEMES = ("inproc://", "ipc://", "tcp://")
_DRAIN_BATCH = 128  # messages per reader callback before yielding to the loop

OnFrames = Callable[[list[zmq.Frame]], None]


class ChannelClosed(ConnectionError):
    """The channel was closed while waiting on it."""


def check_address(address: str) -> str:
    if not address.startswith(SCHEMES):
        raise ValueError(f"unsupported address {address!r}; use inproc://, ipc:// or tcp://")
    return address


def check_plain_bind(address: str) -> None:
    """Refuse an unauthenticated TCP bind beyond loopback (SecurityError): every node socket
    other machines can reach takes CURVE keys, or an explicit insecure."""
    if not address.startswith("tcp://"):
        return
    host = address.removeprefix("tcp://").rpartition(":")[0]
    if not is_loopback(host):
        raise SecurityError(
            f"refusing to bind {address} without CURVE keys: it is reachable beyond this "
            "machine (give keys, see `greenroom keys`, or --insecure)"
        )


def new_context(io_threads: int = 1) -> zmq.Context:
    """The process's zmq context; terminate it only after closing every socket."""
    ctx = zmq.Context(io_threads=io_threads)
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


class Channel:
    """One zmq socket on one event loop: non-blocking sends, callback or awaited receives."""

    def __init__(
        self,
        sock: zmq.Socket,
        loop: asyncio.AbstractEventLoop,
        address: str,
        on_frames: OnFrames | None = None,
        inbox_size: int = DEFAULT_HWM,
    ) -> None:
        self.address = address
        self._sock: zmq.Socket | None = sock
        self._loop = loop
        self._fd = sock.FD
        self._on_frames = on_frames
        self._inbox: deque[list[zmq.Frame]] = deque()
        self._inbox_size = inbox_size
        self._recv_waiter: asyncio.Future | None = None
        self._send_waiters: deque[asyncio.Future] = deque()
        self._paused = False
        self._drain_scheduled = False
        # A ROUTER keeps POLLOUT set while one peer is full, so blocked sends retry on a timer.
        self._retry_s = 0.001 if sock.type == zmq.ROUTER else None
        loop.add_reader(self._fd, self._on_ready)
        self._schedule_drain()

    @property
    def closed(self) -> bool:
        return self._sock is None

    # ------------------------------------------------------------------ send

    def try_send(self, frames: Sequence[Any]) -> bool:
        """Send now if the high-water mark allows; False (nothing sent) otherwise.

        A ROUTER drops messages for a peer that is gone (returns True)."""
        return self.try_send_to_peer(frames) is not False

    def try_send_to_peer(self, frames: Sequence[Any]) -> bool | None:
        """Like try_send, but None when a ROUTER's peer is gone (the message is dropped)."""
        sock = self._sock
        if sock is None:
            raise ChannelClosed(self.address)
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            return None
        finally:
            # the socket's fd is edge-triggered: reading ZMQ_EVENTS here consumes the edge of
            # input or room that arrived meanwhile, so whoever waits on them is served now
            if self._sock is not None and not self._drain_scheduled:
                events = sock.get(zmq.EVENTS)
                if events & zmq.POLLIN or (
                    events & zmq.POLLOUT and self._send_waiters and self._retry_s is None
                ):
                    self._schedule_drain()
        return True

    async def send(self, frames: Sequence[Any]) -> None:
        """Send, waiting while the high-water mark is reached (backpressure)."""
        while not self.try_send(frames):
            waiter = self._loop.create_future()
            self._send_waiters.append(waiter)
            handle = None
            if self._retry_s is not None:
                handle = self._loop.call_later(self._retry_s, _wake, waiter)
            else:
                # room may have come between the failed send and this wait, its edge already
                # consumed: look at the socket's state once more before sleeping on the fd
                self._schedule_drain()
            try:
                await waiter
            finally:
                if handle is not None:
                    handle.cancel()

    # ------------------------------------------------------------------ receive

    async def recv(self) -> list[zmq.Frame]:
        """Next message (a list of zmq Frames); only for channels without on_frames."""
        if self._on_frames is not None:
            raise RuntimeError("this channel delivers frames to its on_frames callback")
        while not self._inbox:
            if self._sock is None:
                raise ChannelClosed(self.address)
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        frames = self._inbox.popleft()
        if self._paused and len(self._inbox) < self._inbox_size // 2:
            self.resume_reading()
        return frames

    def pause_reading(self) -> None:
        """Stop taking messages off the socket; senders then meet the high-water mark."""
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._schedule_drain()

    # ------------------------------------------------------------------ loop integration

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._on_ready)

    def _on_ready(self) -> None:
        self._drain_scheduled = False
        sock = self._sock
        if sock is None:
            return
        for _ in range(_DRAIN_BATCH):
            events = sock.get(zmq.EVENTS)
            if events & zmq.POLLOUT and self._send_waiters:
                while self._send_waiters:
                    _wake(self._send_waiters.popleft())
            if not events & zmq.POLLIN or self._paused:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self._on_frames is not None:
                self._on_frames(frames)
            else:
                self._inbox.append(frames)
                if self._recv_waiter is not None:
                    _wake(self._recv_waiter)
                if len(self._inbox) >= self._inbox_size:
                    self._paused = True
            sock = self._sock
            if sock is None:
                return
        self._schedule_drain()

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Close the socket now (LINGER=0); waiters get ChannelClosed. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        sock.close(linger=0)
        for waiter in (self._recv_waiter, *self._send_waiters):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ChannelClosed(self.address))
        self._send_waiters.clear()


def set_heartbeat(sock: zmq.Socket, interval_s: float) -> None:
    """ZMTP heartbeats: ping every ``interval_s``; no traffic for 3 intervals drops the peer."""
    ms = max(1, int(interval_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ms)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Transport:
    """Creates channels on one event loop from a shared context, and closes them."""

    def __init__(
        self,
        ctx: zmq.Context,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        self.ctx = ctx
        self.loop = loop or asyncio.get_running_loop()
        self.hwm = hwm
        self._channels: set[Channel] = set()

    def bind_router(
        self,
        address: str,
        on_frames: OnFrames | None = None,
        *,
        max_message_bytes: int = 0,
        heartbeat_s: float = 0.0,
        security: SocketSecurity | None = None,
        insecure: bool = False,
    ) -> Channel:
        """A ROUTER: received frames start with the sender's identity; reply with it first.

        ``max_message_bytes`` > 0: a peer sending a bigger message is disconnected before the
        message is buffered. ``heartbeat_s`` > 0: ZMTP pings every that many seconds; a peer
        silent for three intervals is disconnected. ``security``: CURVE, clients authorized
        by the context's ZAP handler; without it a TCP bind beyond loopback is refused unless
        ``insecure``."""
        if security is None and not insecure:
            check_plain_bind(address)
        sock = self._socket(zmq.ROUTER)
        if max_message_bytes > 0:
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if heartbeat_s > 0:
            set_heartbeat(sock, heartbeat_s)
        elif address.startswith("tcp://"):  # a peer host that dies is found in about 25 s
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if security is not None:
            security.apply_server(sock)
        return self._bind_socket(sock, address, on_frames)

    def connect_dealer(
        self, address: str, on_frames: OnFrames | None = None, keys: ClientKeys | None = None
    ) -> Channel:
        """A DEALER; with ``keys``, a CURVE client of the server whose public key they hold."""
        return self.connect(zmq.DEALER, address, on_frames, keys)

    def bind_pull(self, address: str, on_frames: OnFrames | None = None) -> Channel:
        return self.bind(zmq.PULL, address, on_frames)

    def connect_push(self, address: str) -> Channel:
        return self.connect(zmq.PUSH, address)

    def bind(
        self, kind: int, address: str, on_frames: OnFrames | None = None, insecure: bool = False
    ) -> Channel:
        """A plain socket: a TCP bind beyond loopback is refused unless ``insecure``."""
        if not insecure:
            check_plain_bind(address)
        return self._bind_socket(self._socket(kind), address, on_frames)

    def _bind_socket(self, sock: zmq.Socket, address: str, on_frames: OnFrames | None) -> Channel:
        try:
            sock.bind(check_address(address))
            bound = sock.get(zmq.LAST_ENDPOINT).decode()
        except BaseException:
            sock.close(linger=0)
            raise
        return self._track(Channel(sock, self.loop, bound, on_frames, self.hwm))

    def connect(
        self,
        kind: int,
        address: str,
        on_frames: OnFrames | None = None,
        keys: ClientKeys | None = None,
    ) -> Channel:
        sock = self._socket(kind)
        if keys is not None:
            keys.apply(sock)
        try:
            sock.connect(check_address(address))
        except BaseException:
            sock.close(linger=0)
            raise
        return self._track(Channel(sock, self.loop, address, on_frames, self.hwm))

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.copy_threshold = OOB_THRESHOLD
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # full peer: EAGAIN, not a silent drop
        return sock

    def _track(self, channel: Channel) -> Channel:
        self._channels = {c for c in self._channels if not c.closed}
        self._channels.add(channel)
        return channel

    def close(self) -> None:
        """Close every channel this transport made."""
        for channel in list(self._channels):
            channel.close()
        self._channels.clear()
