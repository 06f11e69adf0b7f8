"""msgpack codec for bus messages: `encode(msg) -> frames`, `decode(frames) -> msg`.

A message encodes to one msgpack body frame followed by zero or more out-of-band
frames. numpy arrays and CPU torch tensors of at least `OOB_THRESHOLD` bytes travel
as their own frames, never copied by the codec (send them with `copy=False`);
smaller ones are inlined as msgpack extensions. Anything msgspec cannot encode
natively raises `CodecError` — nothing is ever pickled.

Decoding targets the tagged union of every imported `Message` subclass (plus
`None`, the empty reply). A class defined after the first decode is picked up on
the first frame that names its tag. Arrays decoded from out-of-band frames are
read-only views over the received frame; copy before mutating. An array sent
out-of-band must not be mutated until the send completes.

Malformed frames (bad msgpack, unknown tag, wrong field types, bad array
metadata) raise `CodecError`; a receiver should log and drop them.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Union

import msgspec
import numpy as np

from greenroom.bus.messages import Message

OOB_THRESHOLD = 64 * 1024

_EXT_NDARRAY = 1
_EXT_NDARRAY_OOB = 2
_EXT_TENSOR = 3
_EXT_TENSOR_OOB = 4

Frame = bytes | memoryview


class CodecError(ValueError):
    """A message could not be encoded, or frames could not be decoded."""


def _all_message_types() -> list[type]:
    """Every concrete tagged Message subclass; the latest definition wins a tag."""
    by_tag: dict[str, type] = {}
    stack = list(Message.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        by_tag[cls.__struct_config__.tag] = cls
    return list(by_tag.values())


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufcmM":
        raise CodecError(f"cannot encode arrays of dtype {dtype!r}")


def _torch_dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class _Codec:
    """One encoder/decoder pair; not shared between threads (see `_local`)."""

    def __init__(self) -> None:
        self._oob: list[Frame] = []
        self._frames: Sequence[Any] = ()
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._meta_encoder = msgspec.msgpack.Encoder()
        self._meta_decoder = msgspec.msgpack.Decoder(tuple)
        self._num_types = -1
        self._decoder: msgspec.msgpack.Decoder | None = None

    # ------------------------------------------------------------------ encode

    def encode(self, msg: Any) -> list[Frame]:
        self._oob = oob = []
        try:
            body = self._encoder.encode(msg)
        except CodecError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        finally:
            self._oob = []
        if not oob:
            return [body]
        return [body, *oob]

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return self._encode_array(obj, _EXT_NDARRAY, _EXT_NDARRAY_OOB, obj.dtype.str)
        if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
            return obj.item()
        module = type(obj).__module__
        if module.startswith("torch"):
            torch = sys.modules["torch"]
            if isinstance(obj, torch.Tensor):
                return self._encode_tensor(obj, torch)
        raise CodecError(f"cannot encode objects of type {type(obj).__qualname__}")

    def _encode_array(self, arr: np.ndarray, inline: int, oob: int, dtype: str) -> Any:
        _check_dtype(arr.dtype)
        arr = np.ascontiguousarray(arr)
        shape = list(arr.shape)
        if arr.nbytes < OOB_THRESHOLD:
            meta = (dtype, shape, arr.tobytes())
            return msgspec.msgpack.Ext(inline, self._meta_encoder.encode(meta))
        self._oob.append(memoryview(arr.reshape(-1).view(np.uint8)))
        meta = (dtype, shape, len(self._oob))
        return msgspec.msgpack.Ext(oob, self._meta_encoder.encode(meta))

    def _encode_tensor(self, tensor: Any, torch: Any) -> Any:
        if tensor.device.type != "cpu":
            raise CodecError(f"GPU tensors never go through the codec (got {tensor.device})")
        name = _torch_dtype_name(tensor)
        tensor = tensor.detach().contiguous()
        if tensor.dtype.is_floating_point and tensor.element_size() == 2:
            tensor = tensor.view(torch.int16)  # bfloat16 has no numpy dtype
        elif tensor.dtype == torch.bool:
            tensor = tensor.view(torch.uint8)
        return self._encode_array(tensor.numpy(), _EXT_TENSOR, _EXT_TENSOR_OOB, name)

    # ------------------------------------------------------------------ decode

    def decode(self, frames: Sequence[Any]) -> Any:
        if not frames:
            raise CodecError("no frames to decode")
        self._frames = frames
        try:
            return self._decode_body(frames[0])
        except CodecError:
            raise
        except (msgspec.DecodeError, ValueError, TypeError, IndexError) as exc:
            raise CodecError(f"malformed message: {exc}") from exc
        finally:
            self._frames = ()

    def _decode_body(self, body: Any) -> Any:
        decoder = self._decoder
        if decoder is None:
            decoder = self._rebuild()
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as exc:
            # A Message subclass defined since the decoder was built: rebuild once.
            if "Invalid value" not in str(exc) or not self._stale():
                raise
            return self._rebuild().decode(body)

    def _stale(self) -> bool:
        return len(_all_message_types()) != self._num_types

    def _rebuild(self) -> msgspec.msgpack.Decoder:
        types = _all_message_types()
        self._num_types = len(types)
        target = Union[tuple(types) + (type(None),)]  # noqa: UP007
        self._decoder = msgspec.msgpack.Decoder(
            target, dec_hook=self._dec_hook, ext_hook=self._ext_hook
        )
        return self._decoder

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code not in (_EXT_NDARRAY, _EXT_NDARRAY_OOB, _EXT_TENSOR, _EXT_TENSOR_OOB):
            raise CodecError(f"unknown extension type {code}")
        dtype_name, shape, payload = self._meta_decoder.decode(data)
        is_tensor = code in (_EXT_TENSOR, _EXT_TENSOR_OOB)
        if code in (_EXT_NDARRAY_OOB, _EXT_TENSOR_OOB):
            if not isinstance(payload, int) or not 1 <= payload < len(self._frames):
                raise CodecError(f"array refers to missing frame {payload!r}")
            frame = self._frames[payload]
            payload = getattr(frame, "buffer", frame)
        elif not isinstance(payload, bytes):
            raise CodecError("inline array payload is not bytes")
        if is_tensor:
            return _tensor_from_buffer(dtype_name, shape, payload)
        dtype = np.dtype(dtype_name)
        _check_dtype(dtype)
        arr = np.frombuffer(payload, dtype=dtype).reshape(shape)
        arr.flags.writeable = False
        return arr

    @staticmethod
    def _dec_hook(target: type, obj: Any) -> Any:
        if isinstance(obj, target):
            return obj
        raise CodecError(f"expected {target.__qualname__}, got {type(obj).__qualname__}")


def _tensor_from_buffer(dtype_name: str, shape: list[int], buffer: Any) -> Any:
    import torch

    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"unknown tensor dtype {dtype_name!r}")
    carrier = {2: np.int16, 1: np.uint8}.get(dtype.itemsize) if _needs_carrier(dtype) else None
    np_dtype = carrier or torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(buffer, dtype=np_dtype).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: documented above
        tensor = torch.from_numpy(arr)
    return tensor.view(dtype) if carrier is not None else tensor


def _needs_carrier(dtype: Any) -> bool:
    import torch

    return dtype == torch.bool or (dtype.is_floating_point and dtype.itemsize == 2)


_local = threading.local()


def _codec() -> _Codec:
    codec = getattr(_local, "codec", None)
    if codec is None:
        codec = _local.codec = _Codec()
    return codec


def encode(msg: Any) -> list[Frame]:
    """Encode a message (or None) into a body frame plus out-of-band array frames."""
    return _codec().encode(msg)


def decode(frames: Sequence[Any]) -> Any:
    """Decode frames (bytes, memoryviews or zmq Frames) back into a message or None."""
    return _codec().decode(frames)
