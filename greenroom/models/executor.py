"""PlanExecutor: runs the scheduler's StepPlans on a ModelRunner; the engine actor wraps it.

The executor keeps, per sequence, only what a forward needs (tokens, how many are computed,
block table, sampling parameters). It owns no scheduling decisions: sequences live until a
plan lists them in ``finished``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from greenroom.bus.messages import (
    BlockCopy,
    NewSequence,
    SampledToken,
    SamplingParams,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from greenroom.models.batch import SequenceChunk
from greenroom.models.kv_pool import allocate_kv_pool
from greenroom.models.logits_adjust import LogitsAdjustments, needs_adjustment
from greenroom.models.runner import GraphKind, ModelRunner
from greenroom.models.sampling import SamplingBatch, request_seed, sample
from greenroom.models.token_history import TokenHistory


class PlanError(ValueError):
    """A plan the executor cannot run (unknown request, block table too short, ...)."""


@dataclass
class Sequence:
    request_id: str
    tokens: list[int]
    num_computed: int
    block_ids: list[int]
    sampling: SamplingParams
    seed: int
    num_output_tokens: int  # index of the next output token to sample
    adjusts: bool = False  # penalties, logit bias or min_tokens (not the sampler's fast path)
    history_slot: int = -1  # its TokenHistory row when it has a penalty


class PlanExecutor:
    def __init__(
        self,
        runner: ModelRunner,
        host_blocks: int = 0,
        graph_stream: torch.cuda.Stream | None = None,
        graphs: GraphKind = "decode",
    ) -> None:
        """``graphs``: the runner's graphs this executor replays: ``"decode"`` (captured here
        on ``graph_stream`` if not yet), ``"prefill"`` (an SM-disaggregation context engine:
        those captured on its partition's stream, if any) or ``"none"`` (all eager)."""
        self.runner = runner
        self.graph_kind = graphs
        self.sequences: dict[str, Sequence] = {}
        self.history: TokenHistory | None = None  # created by the first request with a penalty
        self._num_adjusting = 0  # sequences with penalties, logit bias or min_tokens
        self.host_pool: torch.Tensor | None = None
        if host_blocks:
            self.host_pool = allocate_kv_pool(
                host_blocks,
                runner.arch,
                runner.tokens_per_block,
                runner.dtype,
                torch.device("cpu"),
                pin_memory=runner.device.type == "cuda",
            )
        self._copy_stream = (
            torch.cuda.Stream(runner.device) if runner.device.type == "cuda" else None
        )
        # Called with each sequence whose prompt completed this step (SM-disaggregation hook).
        self.on_sequence_ready: Callable[[Sequence], None] | None = None
        # Profiling: when True, each forward is bracketed by CUDA events (``forward_events``).
        self.time_forwards = False
        self.forward_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if graphs == "decode" and runner.graphs is None:
            runner.capture_cuda_graphs(graph_stream)

    # ------------------------------------------------------------------ plan phases

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        if self.host_pool is None:
            raise PlanError("the plan has block copies but this engine has no host tier")
        gpu, host = self.runner.kv_pool, self.host_pool
        for c in copies:
            if c.kind not in ("offload", "onboard"):
                raise PlanError(f"block copy kind {c.kind!r} is invalid: offload or onboard")
            gpu_block, host_block = (c.src, c.dst) if c.kind == "offload" else (c.dst, c.src)
            if not 0 < gpu_block < gpu.shape[0] or not 0 <= host_block < host.shape[0]:
                raise PlanError(f"block copy {c} is out of range")
        if self._copy_stream is None:
            for c in copies:
                if c.kind == "offload":
                    host[c.dst].copy_(gpu[c.src])
                else:
                    gpu[c.dst].copy_(host[c.src])
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._copy_stream):
            for c in copies:
                if c.kind == "offload":
                    host[c.dst].copy_(gpu[c.src], non_blocking=True)
                else:
                    gpu[c.dst].copy_(host[c.src], non_blocking=True)
        torch.cuda.current_stream().wait_stream(self._copy_stream)

    def _register(self, new: NewSequence) -> None:
        n = len(new.prompt_token_ids)
        if not 0 <= new.num_cached_tokens < n or not 0 <= new.num_output_tokens < n:
            raise PlanError(
                f"request {new.request_id!r}: num_cached_tokens = {new.num_cached_tokens} and "
                f"num_output_tokens = {new.num_output_tokens} must be in [0, {n}) "
                "(at least one prompt token is computed)"
            )
        s = new.sampling
        self._forget(new.request_id)
        slot = -1
        if s.has_penalties:
            if self.history is None:
                self.history = TokenHistory(self.runner.vocab_size, self.runner.device)
            split = n - new.num_output_tokens
            tokens = new.prompt_token_ids
            slot = self.history.add(list(tokens[:split]), list(tokens[split:]))
        adjusts = needs_adjustment(s)
        self._num_adjusting += adjusts
        self.sequences[new.request_id] = Sequence(
            request_id=new.request_id,
            tokens=list(new.prompt_token_ids),
            num_computed=new.num_cached_tokens,
            block_ids=list(new.block_ids),
            sampling=s,
            seed=s.seed
            if s.seed is not None
            else request_seed(new.request_id, self.runner.model_cfg.seed),
            num_output_tokens=new.num_output_tokens,
            adjusts=adjusts,
            history_slot=slot,
        )

    def _forget(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self._num_adjusting -= seq.adjusts
        if seq is not None and seq.history_slot >= 0:
            assert self.history is not None
            self.history.remove(seq.history_slot)

    def _chunk(self, request_id: str, num_tokens: int, new_block_ids: list[int]) -> SequenceChunk:
        seq = self.sequences.get(request_id)
        if seq is None:
            raise PlanError(f"step for unknown request {request_id!r}")
        seq.block_ids.extend(new_block_ids)
        start, end = seq.num_computed, seq.num_computed + num_tokens
        if num_tokens < 1 or end > len(seq.tokens):
            raise PlanError(
                f"request {request_id!r}: step of {num_tokens} tokens from {start} exceeds "
                f"the {len(seq.tokens)} known tokens"
            )
        if end > self.runner.max_model_len:
            raise PlanError(
                f"request {request_id!r}: {end} tokens exceed max_model_len "
                f"{self.runner.max_model_len}"
            )
        capacity = len(seq.block_ids) * self.runner.tokens_per_block
        if end > capacity:
            raise PlanError(
                f"request {request_id!r}: {end} tokens exceed its block table "
                f"({len(seq.block_ids)} blocks = {capacity} tokens)"
            )
        return SequenceChunk(seq.tokens[start:end], start, seq.block_ids)

    # ------------------------------------------------------------------ execute

    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        for request_id in plan.finished:
            self._forget(request_id)
        self._copy_blocks(plan.copies)
        for new in plan.new:
            self._register(new)
        if not plan.steps:
            return StepResult(iteration=plan.iteration, flow=plan.flow)
        ids = [s.request_id for s in plan.steps]
        if len(set(ids)) != len(ids):
            raise PlanError(f"plan {plan.iteration} steps a request more than once: {ids}")
        chunks = [self._chunk(s.request_id, s.num_tokens, s.new_block_ids) for s in plan.steps]
        batch = self.runner.build_batch(chunks)
        ready_rows, ready = [], []
        for row, step in enumerate(plan.steps):
            seq = self.sequences[step.request_id]
            if seq.num_computed + step.num_tokens == len(seq.tokens):
                ready_rows.append(row)
                ready.append(seq)
        # Every host-to-device copy of the step goes before the forward: a copy from pageable
        # memory waits on the host until its stream has drained, so after the launch it would
        # hold the host for the whole forward.
        sampling = self._prepare_sampling(ready_rows, ready, len(plan.steps))
        timed = self.time_forwards and self.runner.device.type == "cuda"
        if timed:
            self.forward_events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self.forward_events[0].record()
        logits = self.runner.forward(batch, graphs=self.graph_kind)
        if timed:
            self.forward_events[1].record()
        for step in plan.steps:
            self.sequences[step.request_id].num_computed += step.num_tokens
        sampled = self._sample(logits, ready, sampling)
        if self.on_sequence_ready is not None:
            for seq in ready:
                self.on_sequence_ready(seq)
        return StepResult(
            iteration=plan.iteration,
            sampled=sampled,
            flow=plan.flow,
            duration_s=time.perf_counter() - started,
        )

    def _prepare_sampling(
        self, rows: list[int], seqs: list[Sequence], num_rows: int
    ) -> tuple[torch.Tensor | None, SamplingBatch] | None:
        """(rows of the logits to sample, or None for all; the sampling batch), on the device."""
        if not seqs:
            return None
        device = self.runner.device
        index = None
        if len(rows) != num_rows:
            index = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        params = [s.sampling for s in seqs]
        steps = [s.num_output_tokens for s in seqs]
        adjustments = None
        if self._num_adjusting and any(s.adjusts for s in seqs):
            adjustments = LogitsAdjustments.build(
                params,
                steps,
                [s.history_slot for s in seqs],
                list(self.runner.eos_token_ids),
                self.history,
                device,
            )
        sampling = SamplingBatch.build(params, [s.seed for s in seqs], steps, device, adjustments)
        return index, sampling

    def _sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        prepared: tuple[torch.Tensor | None, SamplingBatch] | None,
    ) -> list[SampledToken]:
        if prepared is None:
            return []
        index, batch = prepared
        if index is not None:
            logits = logits.index_select(0, index)
        out = sample(logits, batch)
        if batch.adjustments is not None:
            batch.adjustments.record(out.token_ids)
        token_ids = out.token_ids.tolist()
        if out.top_ids is not None:
            token_lps = out.token_logprobs.tolist()
            top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        result = []
        for i, (seq, token) in enumerate(zip(seqs, token_ids, strict=True)):
            seq.tokens.append(token)
            seq.num_output_tokens += 1
            logprobs = None
            n = seq.sampling.logprobs
            if n > 0:
                logprobs = TokenLogprobs(token_lps[i], top_ids[i][:n], top_lps[i][:n])
            result.append(SampledToken(seq.request_id, token, logprobs))
        return result
