"""A sequence's block table on the host: a growing int64 array, so a batch copies each row in
one numpy assignment instead of converting a Python list of block ids every step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class BlockList:
    """List-like block ids (``extend``, ``len``, indexing, ``del ids[n:]``) over an array."""

    __slots__ = ("_buf", "_n")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        self._buf = np.empty(max(16, 2 * ids.size), dtype=np.int64)
        self._buf[: ids.size] = ids
        self._n = ids.size

    def extend(self, ids: Iterable[int]) -> None:
        if not isinstance(ids, np.ndarray):
            if not ids:  # most steps add no block
                return
            ids = np.asarray(ids, dtype=np.int64)
        end = self._n + ids.size
        if end > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, end), dtype=np.int64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = ids
        self._n = end

    def array(self) -> np.ndarray:
        """The ids as an array view (valid until the next ``extend``)."""
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key):
        item = self._buf[: self._n][key]
        return int(item) if isinstance(key, (int, np.integer)) else item

    def __delitem__(self, key: slice) -> None:
        if not isinstance(key, slice) or key.stop is not None or key.step is not None:
            raise TypeError("a block list only drops a tail: del ids[n:]")
        start = key.start or 0
        self._n = max(0, min(self._n, start if start >= 0 else self._n + start))

    def __iter__(self) -> Iterator[int]:
        return iter(self._buf[: self._n].tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlockList):
            other = other.array()
        try:
            return list(self) == list(other)  # type: ignore[call-overload]
        except TypeError:
            return NotImplemented

    def __repr__(self) -> str:
        return f"BlockList({list(self)})"


__all__ = ["BlockList"]
