"""The rank layout: which (pp stage, cp rank, tp rank) a global rank is, and on which node.

Global ranks are ordered tp fastest, then cp, then pp::

    rank = (pp * cp_size + cp) * tp_size + tp

so a TP group is a run of consecutive ranks (one node, one NVLink domain, when the ranks of a
node are consecutive), a Helix CP x TP group is the run of ``cp_size * tp_size`` ranks of one
stage, and a PP group steps over whole stages. Node ``n`` hosts ranks
``[n * ranks_per_node, (n + 1) * ranks_per_node)``; local rank = the GPU index on that node.

Every process computes the same groups from the same layout (``groups(axes)``), which is what
torch.distributed needs: each group is created once, by every rank, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

AXES = ("pp", "cp", "tp")  # slowest to fastest


class LayoutError(ValueError):
    """An inconsistent layout; the message says which numbers disagree."""


@dataclass(frozen=True)
class RankCoords:
    pp: int
    cp: int
    tp: int


@dataclass(frozen=True)
class RankLayout:
    pp_size: int = 1
    cp_size: int = 1
    tp_size: int = 1
    nnodes: int = 1

    def __post_init__(self) -> None:
        for name in ("pp_size", "cp_size", "tp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} = {getattr(self, name)} is invalid: must be >= 1")
        if self.world_size % self.nnodes:
            raise LayoutError(
                f"inconsistent world size: pp_size * cp_size * tp_size = {self.world_size} ranks "
                f"cannot be spread evenly over {self.nnodes} nodes"
            )

    @property
    def world_size(self) -> int:
        return self.pp_size * self.cp_size * self.tp_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def size(self, axis: str) -> int:
        return getattr(self, f"{axis}_size")

    def coords(self, rank: int) -> RankCoords:
        self._check(rank)
        tp = rank % self.tp_size
        cp = (rank // self.tp_size) % self.cp_size
        pp = rank // (self.tp_size * self.cp_size)
        return RankCoords(pp=pp, cp=cp, tp=tp)

    def rank_of(self, pp: int = 0, cp: int = 0, tp: int = 0) -> int:
        if not (0 <= pp < self.pp_size and 0 <= cp < self.cp_size and 0 <= tp < self.tp_size):
            raise LayoutError(f"coordinates pp={pp} cp={cp} tp={tp} are outside {self}")
        return (pp * self.cp_size + cp) * self.tp_size + tp

    def node_of(self, rank: int) -> int:
        self._check(rank)
        return rank // self.ranks_per_node

    def local_rank(self, rank: int) -> int:
        self._check(rank)
        return rank % self.ranks_per_node

    def ranks_on_node(self, node: int) -> range:
        if not 0 <= node < self.nnodes:
            raise LayoutError(f"node {node} is outside 0..{self.nnodes - 1}")
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def groups(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every group of ranks that differ only along ``axes`` (the others fixed), in a fixed
        order: ``("tp",)`` the TP groups, ``("cp", "tp")`` the Helix groups of each stage."""
        unknown = set(axes) - set(AXES)
        if unknown:
            raise LayoutError(f"unknown axes {sorted(unknown)}; axes are {AXES}")
        fixed = [a for a in AXES if a not in axes]
        varying = [a for a in AXES if a in axes]
        out = []
        for fixed_values in product(*(range(self.size(a)) for a in fixed)):
            base = dict(zip(fixed, fixed_values, strict=True))
            group = []
            for values in product(*(range(self.size(a)) for a in varying)):
                group.append(self.rank_of(**base, **dict(zip(varying, values, strict=True))))
            out.append(sorted(group))
        return out

    def group_of(self, rank: int, axes: tuple[str, ...]) -> list[int]:
        return next(g for g in self.groups(axes) if rank in g)

    def describe(self) -> str:
        """One line per node: its ranks with their coordinates (printed at launch)."""
        lines = [
            f"layout: {self.world_size} ranks = pp {self.pp_size} x cp {self.cp_size} x "
            f"tp {self.tp_size} on {self.nnodes} node(s), {self.ranks_per_node} per node"
        ]
        for node in range(self.nnodes):
            cells = []
            for rank in self.ranks_on_node(node):
                c = self.coords(rank)
                cells.append(f"{rank}(pp{c.pp} cp{c.cp} tp{c.tp})")
            lines.append(f"  node {node}: " + " ".join(cells))
        return "\n".join(lines)

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside 0..{self.world_size - 1}")
