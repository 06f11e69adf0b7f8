"""A bounded FIFO from any thread into one consumer event loop.

Producers on the consumer's loop, on other loops (actors hosted in threads) or
on no loop at all may put; only the owning actor gets. A full mailbox makes
`put` wait (backpressure) and `put_nowait` raise `MailboxFull`. Closing it
hands the queued items back to the closer (to fail their asks) and makes every
later or waiting put raise the closer's error.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from greenroom.actors.errors import ActorError, ActorStopped, MailboxFull

EMPTY = object()  # get_nowait: nothing queued
CLOSED = object()  # get_nowait / get: the mailbox is closed

_running_loop = asyncio._get_running_loop


def call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn(*args) on loop: now when already there, else through call_soon_threadsafe."""
    if _running_loop() is loop:
        fn(*args)
        return
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        pass


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Mailbox:
    def __init__(self, maxsize: int, loop: asyncio.AbstractEventLoop) -> None:
        if maxsize < 1:
            raise ValueError("mailbox size must be >= 1")
        self.maxsize = maxsize
        self._loop = loop
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._getter: asyncio.Future | None = None
        # Wakers for producers waiting for room: (loop, fn, arg), run once each.
        self._space_waiters: deque[tuple[asyncio.AbstractEventLoop, Callable, Any]] = deque()
        self._closed_error: ActorError | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    # ------------------------------------------------------------------ producers

    def offer(self, item: Any) -> bool:
        """Queue item if there is room; False when full. Raises if closed."""
        with self._lock:
            if self._closed_error is not None:
                raise self._closed_error
            if len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            getter, self._getter = self._getter, None
        if getter is not None:
            call_on(self._loop, _wake, getter)
        return True

    def put_nowait(self, item: Any) -> None:
        if not self.offer(item):
            raise MailboxFull(f"mailbox full ({self.maxsize})")

    async def put(self, item: Any) -> None:
        """Queue item, waiting while the mailbox is full."""
        while not self.offer(item):
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            if not self._add_space_waiter(loop, _wake, fut):
                continue
            await fut

    def when_space(self, loop: asyncio.AbstractEventLoop, fn: Callable, arg: Any) -> None:
        """Call fn(arg) on loop once an item leaves (or the mailbox closes)."""
        if not self._add_space_waiter(loop, fn, arg):
            call_on(loop, fn, arg)

    def _add_space_waiter(self, loop: asyncio.AbstractEventLoop, fn: Callable, arg: Any) -> bool:
        with self._lock:
            if self._closed_error is None and len(self._items) < self.maxsize:
                return False  # room appeared meanwhile
            self._space_waiters.append((loop, fn, arg))
            return True

    # ------------------------------------------------------------------ consumer

    def get_nowait(self) -> Any:
        """The next item, EMPTY, or CLOSED (queued items are dropped by close)."""
        with self._lock:
            if self._closed_error is not None:
                return CLOSED
            if not self._items:
                return EMPTY
            item = self._items.popleft()
            waiter = self._space_waiters.popleft() if self._space_waiters else None
        if waiter is not None:
            call_on(*waiter)
        return item

    async def get(self) -> Any:
        while True:
            item = self.get_nowait()
            if item is not EMPTY:
                return item
            with self._lock:
                if self._items or self._closed_error is not None:
                    continue
                self._getter = fut = self._loop.create_future()
            try:
                await fut
            finally:
                self._getter = None

    def close(self, error: ActorError | None = None) -> list[Any]:
        """Close with the error later puts raise; returns the items still queued."""
        with self._lock:
            if self._closed_error is None:
                self._closed_error = error or ActorStopped("actor stopped")
            items = list(self._items)
            self._items.clear()
            waiters = list(self._space_waiters)
            self._space_waiters.clear()
            getter, self._getter = self._getter, None
        for waiter in waiters:
            call_on(*waiter)
        if getter is not None:
            call_on(self._loop, _wake, getter)
        return items
