"""What slice of each weight a tensor-parallel rank holds (Megatron-style).

- q heads split evenly; KV heads split evenly when ``tp_size`` divides them, else (fewer KV
  heads than ranks) each rank holds the one KV head its q heads read, replicated;
- gate/up split by rows, down by columns (the intermediate dim); o_proj by columns;
- embedding and LM head split by vocabulary rows, padded up to ``tp_size * vocab_per_rank``:
  padded embedding rows are never looked up and padded logits columns are cut off before
  sampling, so the vocabulary need not divide by ``tp_size``.

A Helix context-parallel rank (``helix``) shards the same way over its CP group except that it
keeps every q, k and v head of its TP slice (all of them without TP: it attends them over its
share of the KV); its o_proj takes the head slice the all-to-all hands it
(greenroom.models.helix_attention). With CP x TP the MLP, embedding and LM head split over
all ``cp * tp`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from greenroom.models.arch import ArchConfig, CheckpointError


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    num_heads: int  # local q heads
    num_kv_heads: int  # local KV heads
    kv_head_start: int
    intermediate_size: int  # local
    vocab_per_rank: int  # padded rows per rank
    vocab_size: int  # the checkpoint's
    helix: bool = False  # a CP rank: its TP slice of the heads, o_proj over its head slice
    helix_tp: int = 1  # Helix CP x TP: the TP ranks inside each CP rank (group rank = cp * tp + t)

    @classmethod
    def of(
        cls, arch: ArchConfig, rank: int, size: int, helix: bool = False, helix_tp: int = 1
    ) -> TPShard:
        """``helix``: ``size`` ranks of a Helix group, ``size / helix_tp`` CP ranks of
        ``helix_tp`` TP ranks each; group rank ``c * helix_tp + t`` is CP rank ``c``, TP rank
        ``t``."""
        if helix:
            check_cp_size(arch, size // helix_tp, helix_tp)
            heads, kv, kv_start = _attention_split(arch, rank % helix_tp, helix_tp)
        else:
            check_tp_size(arch, size)
            heads, kv, kv_start = _attention_split(arch, rank, size)
        return cls(
            rank=rank,
            size=size,
            num_heads=heads,
            num_kv_heads=kv,
            kv_head_start=kv_start,
            intermediate_size=arch.intermediate_size // size,
            vocab_per_rank=-(-arch.vocab_size // size),
            vocab_size=arch.vocab_size,
            helix=helix,
            helix_tp=helix_tp if helix else 1,
        )

    def head_rows(self, arch: ArchConfig, first_head: int, heads: int) -> slice:
        return slice(first_head * arch.head_dim, (first_head + heads) * arch.head_dim)

    @property
    def tp_rank(self) -> int:
        """The rank within the heads' TP split (a Helix rank: within its CP rank)."""
        return self.rank % self.helix_tp if self.helix else self.rank

    def q_slice(self, arch: ArchConfig) -> slice:
        return self.head_rows(arch, self.tp_rank * self.num_heads, self.num_heads)

    def o_slice(self, arch: ArchConfig) -> slice:
        """The o_proj input columns: this rank's q heads. A Helix rank: the slice the
        all-to-all over its CP group hands it, slice ``c`` of its TP rank's heads, so head
        slice ``t * cp + c`` of all heads."""
        if not self.helix:
            return self.q_slice(arch)
        cp = self.size // self.helix_tp
        heads = arch.num_heads // self.size
        index = self.tp_rank * cp + self.rank // self.helix_tp
        return self.head_rows(arch, index * heads, heads)

    def kv_slice(self, arch: ArchConfig) -> slice:
        return self.head_rows(arch, self.kv_head_start, self.num_kv_heads)

    @property
    def intermediate_slice(self) -> slice:
        return slice(self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size)

    @property
    def vocab_slice(self) -> slice:
        """The real rows this rank holds (may be short, or empty, at the end)."""
        start = min(self.rank * self.vocab_per_rank, self.vocab_size)
        return slice(start, min(start + self.vocab_per_rank, self.vocab_size))

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def local_arch(self, arch: ArchConfig) -> ArchConfig:
        """The shapes one rank computes with (the vocabulary stays the checkpoint's)."""
        return replace(
            arch,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
        )


def _attention_split(arch: ArchConfig, rank: int, size: int) -> tuple[int, int, int]:
    """(q heads, KV heads, first KV head) of TP rank ``rank`` of ``size``."""
    heads = arch.num_heads // size
    if arch.num_kv_heads >= size:
        kv = arch.num_kv_heads // size
        return heads, kv, rank * kv
    return heads, 1, rank // (size // arch.num_kv_heads)


def check_cp_size(arch: ArchConfig, size: int, tp_size: int = 1) -> None:
    """A CheckpointError naming the numbers when ``arch`` cannot run Helix over ``size`` CP
    ranks (of ``tp_size`` TP ranks each)."""
    if tp_size > 1:
        check_tp_size(arch, tp_size)
    n = size * tp_size
    what = f"cp_size = {size}" if tp_size == 1 else f"cp_size * tp_size = {n}"
    if arch.num_heads % n:
        raise CheckpointError(f"{what} does not divide num_attention_heads = {arch.num_heads}")
    if arch.intermediate_size % n:
        raise CheckpointError(
            f"{what} does not divide intermediate_size = {arch.intermediate_size}"
        )
    if any(arch.window(i) for i in range(arch.num_layers)):
        raise CheckpointError("Helix context parallelism does not support sliding-window layers")


def check_tp_size(arch: ArchConfig, size: int) -> None:
    """A CheckpointError naming the numbers when ``arch`` cannot be split ``size`` ways."""
    if size < 1:
        raise CheckpointError(f"tp_size = {size} is invalid: must be >= 1")
    if arch.num_heads % size:
        raise CheckpointError(
            f"tp_size = {size} does not divide num_attention_heads = {arch.num_heads}"
        )
    kv = arch.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise CheckpointError(
            f"tp_size = {size} and num_key_value_heads = {kv}: one must divide the other"
        )
    if arch.intermediate_size % size:
        raise CheckpointError(
            f"tp_size = {size} does not divide intermediate_size = {arch.intermediate_size}"
        )
