"""Errors an actor's callers see, and the signal that crashes an actor."""

from __future__ import annotations


class ActorError(Exception):
    """Base of every error raised by the actor layer."""


class AskTimeout(ActorError, TimeoutError):
    """No reply within the ask's timeout."""


class ActorStopped(ActorError):
    """The target actor is stopped or not running."""


class ActorCrashed(ActorError):
    """The target actor crashed while the message was queued or being handled."""


class MailboxFull(ActorError):
    """`tell_nowait` found the mailbox (or the socket's high-water mark) full."""


class RemoteError(ActorError):
    """The handler raised: carries the original exception type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self):
        return (type(self), (self.type_name, self.message))


class ActorCrash(BaseException):
    """Raise inside an actor (or call `Actor.crash`) to crash it: its supervisor restarts it.

    A BaseException so that a handler's `except Exception` does not swallow it."""
