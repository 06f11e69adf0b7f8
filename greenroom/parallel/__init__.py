"""Ranks of a node: the rank layout, process groups, tensor-parallel shards, rank workers, launch."""

from greenroom.parallel.layout import AXES, RankCoords, RankLayout

__all__ = ["AXES", "RankCoords", "RankLayout"]
