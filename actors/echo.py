"""Echo: a diagnostic actor that returns every message it is asked (health checks, bus
benchmarks) and counts what it received."""

from __future__ import annotations

import numpy as np

from greenroom.actors.actor import Actor, handles
from greenroom.bus.messages import Message


class EchoCount(Message):
    """Ask how many messages the echo actor has received (this one excluded)."""


class EchoCounted(Message):
    received: int


class EchoArray(Message):
    """A CPU array payload (large ones travel as zero-copy frames)."""

    data: np.ndarray


class Echo(Actor):
    mailbox_size = 1024

    def __init__(self) -> None:
        self.received = 0

    @handles(Message)
    def echo(self, msg: Message) -> Message:
        self.received += 1
        return msg

    @handles(EchoCount)
    def count(self, msg: EchoCount) -> EchoCounted:
        return EchoCounted(received=self.received)
