"""Codec: round trips of every bus message, arrays inline and out-of-band, bad input."""

from __future__ import annotations

import inspect
import typing

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenroom.bus import messages
from greenroom.bus.codec import OOB_THRESHOLD, CodecError, decode, encode
from greenroom.bus.messages import Message

MESSAGE_TYPES = [
    cls
    for _name, cls in inspect.getmembers(messages, inspect.isclass)
    if issubclass(cls, Message) and cls is not Message and cls.__module__ == messages.__name__
]

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOAT = st.floats(allow_nan=False)


def strategy_for(tp: typing.Any) -> st.SearchStrategy:
    """Values of a msgspec-typed annotation (Structs built field by field)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*(strategy_for(a) for a in typing.get_args(tp)))
    if origin is list:
        return st.lists(strategy_for(typing.get_args(tp)[0]), max_size=4)
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=3)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _INT64
    if tp is float:
        return _FLOAT
    if tp is str:
        return st.text(max_size=12)
    if tp is bytes:
        return st.binary(max_size=16)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        fields = {f: strategy_for(hints[f]) for f in tp.__struct_fields__}
        return st.builds(tp, **fields)
    raise TypeError(f"no strategy for {tp!r}")


def test_every_schema_message_type_is_covered() -> None:
    names = {cls.__name__ for cls in MESSAGE_TYPES}
    assert {"StepPlan", "StepResult", "KVStep", "KVStepResult", "TokenDelta"} <= names
    assert {"SubmitRequest", "OutputBatch", "EngineInfo"} <= names


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip_of_arbitrary_messages(cls: type, data: st.DataObject) -> None:
    msg = data.draw(strategy_for(cls))
    frames = encode(msg)
    assert len(frames) == 1
    back = decode(frames)
    assert type(back) is cls
    assert back == msg


def test_none_is_a_message() -> None:
    assert decode(encode(None)) is None


class ArrayMessage(Message):
    name: str
    array: np.ndarray
    tensor: torch.Tensor | None = None
    extra: list[np.ndarray] = []


def test_small_arrays_inline_large_ones_out_of_band() -> None:
    small = np.arange(16, dtype=np.float32).reshape(4, 4)
    large = np.random.default_rng(0).standard_normal((OOB_THRESHOLD // 8 + 3,))
    msg = ArrayMessage(name="a", array=small, extra=[large, small[::2]])
    frames = encode(msg)
    assert len(frames) == 2  # body + the large array
    assert frames[1].nbytes == large.nbytes
    back = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(back.array, small)
    np.testing.assert_array_equal(back.extra[0], large)
    np.testing.assert_array_equal(back.extra[1], small[::2])  # non-contiguous in, equal out
    assert back.extra[0].dtype == large.dtype


def test_out_of_band_frame_is_zero_copy() -> None:
    large = np.ones(OOB_THRESHOLD, dtype=np.uint8)
    frames = encode(ArrayMessage(name="z", array=large))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), large)
    back = decode(frames)
    assert not back.array.flags.writeable


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
@pytest.mark.parametrize("numel", [7, OOB_THRESHOLD])
def test_cpu_tensors_round_trip(dtype: torch.dtype, numel: int) -> None:
    tensor = (torch.arange(numel) % 5).to(dtype).reshape(-1, 1)
    back = decode(encode(ArrayMessage(name="t", array=np.zeros(1), tensor=tensor)))
    assert back.tensor.dtype == dtype
    assert back.tensor.shape == tensor.shape
    assert torch.equal(back.tensor, tensor)


def test_unknown_types_raise_and_nothing_is_pickled() -> None:
    class Opaque:
        pass

    with pytest.raises(CodecError, match="Opaque"):
        encode(messages.RequestError(request_id="r", kind=Opaque(), message="m"))
    with pytest.raises(CodecError, match="dtype"):
        encode(ArrayMessage(name="o", array=np.array([object()], dtype=object)))


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xc1"],  # never-used msgpack byte
        [msgspec.msgpack.encode(["NoSuchMessage", 1])],
        [msgspec.msgpack.encode(["TokenDelta", 5, [1]])],  # request_id must be a str
        [msgspec.msgpack.encode(["ArrayMessage", "x", msgspec.msgpack.Ext(2, b"\x93")])],
        [msgspec.msgpack.encode(["ArrayMessage", "x", msgspec.msgpack.Ext(99, b"")])],
        [
            msgspec.msgpack.encode(
                [
                    "ArrayMessage",
                    "x",
                    msgspec.msgpack.Ext(2, msgspec.msgpack.encode(("<f8", [4], 1))),
                ]
            )
        ],  # refers to an out-of-band frame that is not there
        [
            msgspec.msgpack.encode(
                [
                    "ArrayMessage",
                    "x",
                    msgspec.msgpack.Ext(1, msgspec.msgpack.encode(("<f8", [9], b"12"))),
                ]
            )
        ],  # shape does not match the bytes
    ],
)
def test_malformed_frames_raise_codec_error(frames: list[bytes]) -> None:
    with pytest.raises(CodecError):
        decode(frames)


def test_message_class_defined_after_first_decode_is_found() -> None:
    decode(encode(messages.KVStatsQuery()))

    class LateMessage(Message):
        value: int

    assert decode(encode(LateMessage(value=3))) == LateMessage(value=3)
