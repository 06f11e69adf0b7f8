"""Actors: the actor core and every actor of a node."""

from greenroom.actors.actor import Actor, handles
from greenroom.actors.errors import (
    ActorCrash,
    ActorCrashed,
    ActorError,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    RemoteError,
)
from greenroom.actors.ref import ActorRef
from greenroom.actors.runtime import Runtime
from greenroom.actors.supervisor import Supervisor

__all__ = [
    "Actor",
    "ActorCrash",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorStopped",
    "AskTimeout",
    "MailboxFull",
    "RemoteError",
    "Runtime",
    "Supervisor",
    "handles",
]
