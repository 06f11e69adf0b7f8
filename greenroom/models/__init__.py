"""Llama-family models: config, weights, forward over a paged KV cache."""

from greenroom.models.arch import ArchConfig, CheckpointError
from greenroom.models.batch import ForwardBatch, SequenceChunk
from greenroom.models.executor import PlanError, PlanExecutor
from greenroom.models.runner import ModelRunner
from greenroom.models.tiny import tiny_llama_dir

__all__ = [
    "ArchConfig",
    "CheckpointError",
    "ForwardBatch",
    "ModelRunner",
    "PlanError",
    "PlanExecutor",
    "SequenceChunk",
    "tiny_llama_dir",
]
