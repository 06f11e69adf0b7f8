"""Pipeline stages of one model in one process, for tests: each stage a PlanExecutor over its
own runner, activations handed on through in-memory links (the bus-and-gloo path is
exercised by the node tests); the scheduler's part, the sampled input tokens of each step,
is filled in from the last stage."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import msgspec

from greenroom.bus.messages import SequenceStep, StepPlan, StepResult
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanExecutor


class LocalLink:
    def __init__(self, inbox: deque | None, outbox: deque | None) -> None:
        self.inbox, self.outbox = inbox, outbox

    def recv(self, micro_batch: int, num_tokens: int):
        header, hidden, residual = self.inbox.popleft()
        assert header == (micro_batch, num_tokens), (header, micro_batch, num_tokens)
        return hidden, residual

    def send(self, micro_batch: int, hidden, residual) -> None:
        self.outbox.append(((micro_batch, hidden.shape[0]), hidden.clone(), residual.clone()))


class InProcessPipeline:
    def __init__(
        self, model_dir: Path, pp_size: int, pp_layers: tuple[int, ...] = (), tpb: int = 4
    ) -> None:
        queues = [deque() for _ in range(pp_size - 1)]
        kv = KVConfig(tokens_per_block=tpb, num_blocks=128)
        self.stages = []
        for k in range(pp_size):
            runner = ModelRunner(
                ModelConfig(dtype="float32"), kv, model_dir, "cpu", pp=(k, pp_size, pp_layers)
            )
            link = LocalLink(queues[k - 1] if k else None, queues[k] if k < pp_size - 1 else None)
            self.stages.append(PlanExecutor(runner, link=link))
        self.runner = self.stages[-1].runner

    @property
    def sequences(self):
        return self.stages[-1].sequences

    def execute(self, plan: StepPlan) -> StepResult:
        steps = []
        for s in plan.steps:
            seq = self.sequences.get(s.request_id)
            tokens = []
            if seq is not None:
                tokens = seq.tokens[seq.num_computed : seq.num_computed + s.num_tokens]
            steps.append(SequenceStep(s.request_id, s.num_tokens, s.new_block_ids, tokens))
        plan = msgspec.structs.replace(plan, steps=steps)
        result = None
        for ex in self.stages:
            result = ex.execute(plan)
        return result
