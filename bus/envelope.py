"""Actor-infrastructure wire format: a fixed header frame, then the codec's frames.

Between a DEALER (the asker) and a ROUTER (the actor's server) every message is
`[header, *payload]`; the ROUTER sees the DEALER's identity frame first. The
header packs the kind and the ask's correlation id (0 for tells and controls).
"""

from __future__ import annotations

import struct
from enum import IntEnum

from greenroom.bus.codec import CodecError
from greenroom.bus.messages import Message

_HEADER = struct.Struct("<BQ")


class Kind(IntEnum):
    TELL = 1
    ASK = 2
    REPLY = 3  # payload: the handler's return value (a Message or None)
    FAILURE = 4  # payload: ActorFailure


_KINDS = frozenset(int(k) for k in Kind)


def pack_header(kind: Kind, correlation_id: int = 0) -> bytes:
    return _HEADER.pack(kind, correlation_id)


def unpack_header(header: bytes | memoryview) -> tuple[int, int]:
    """(kind, correlation id); CodecError for anything that is not a header."""
    if len(header) != _HEADER.size:
        raise CodecError(f"bad envelope header of {len(header)} bytes")
    kind, correlation_id = _HEADER.unpack(header)
    if kind not in _KINDS:
        raise CodecError(f"unknown envelope kind {kind}")
    return kind, correlation_id


class ActorFailure(Message):
    """Why an ask failed on the serving side.

    kind: "remote" (the handler raised error_type), "stopped", "crashed" or
    "codec" (the request or the reply could not be encoded/decoded)."""

    kind: str
    error_type: str = ""
    message: str = ""
