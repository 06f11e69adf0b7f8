"""PlanExecutor: runs the scheduler's StepPlans on a ModelRunner; the engine actor wraps it.

The executor keeps, per sequence, only what a forward needs (tokens, how many are computed,
block table, sampling parameters). It owns no scheduling decisions: sequences live until a
plan lists them in ``finished``.

A pipeline stage's executor (``link``) takes the previous stage's activations before its
forward and, before the last stage, sends its own on instead of sampling; its sequences
learn sampled tokens from the plan (``SequenceStep.token_ids``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from greenroom.bus.messages import (
    BlockCopy,
    NewSequence,
    SampledToken,
    SamplingParams,
    SequenceStep,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from greenroom.models.batch import ForwardBatch, SequenceChunk, upload_packed
from greenroom.models.block_list import BlockList
from greenroom.models.kv_pool import allocate_kv_pool
from greenroom.models.logits_adjust import LogitsAdjustments, needs_adjustment
from greenroom.models.runner import GraphKind, ModelRunner
from greenroom.models.sampling import (
    SamplerOutput,
    SamplingBatch,
    is_plain_greedy,
    request_seed,
    sample,
)
from greenroom.models.token_history import TokenHistory

if TYPE_CHECKING:
    from greenroom.parallel.pipe import StageLink


class PlanError(ValueError):
    """A plan the executor cannot run (unknown request, block table too short, ...)."""


@dataclass
class Sequence:
    request_id: str
    tokens: list[int]
    num_computed: int
    block_ids: BlockList
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
        link: StageLink | None = None,
    ) -> None:
        """``graphs``: the runner's graphs this executor replays: ``"decode"`` (captured here
        on ``graph_stream`` if not yet), ``"prefill"`` (an SM-disaggregation context engine:
        those captured on its partition's stream, if any) or ``"none"`` (all eager)."""
        self.runner = runner
        self.graph_kind = graphs
        self.link = link
        self.samples = runner.stage.is_last
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
        # host phases of the last finished step (StepTiming.phases)
        self.last_timing: dict[str, float] = {}
        # request id -> (launched step, row) of a sampled token the host has not read yet
        self._pending: dict[str, tuple[LaunchedStep, int]] = {}
        if graphs == "decode" and runner.graphs is None:
            runner.capture_cuda_graphs(graph_stream)

    # ------------------------------------------------------------------ plan phases

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        helix = getattr(self.runner, "helix", None)
        if copies and helix is not None:
            copies = helix.own_copies(copies)
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
        if s.has_penalties and self.samples:
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
            block_ids=BlockList(new.block_ids),
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

    def _chunk(self, step: SequenceStep) -> SequenceChunk:
        request_id, num_tokens = step.request_id, step.num_tokens
        seq = self.sequences.get(request_id)
        if seq is None:
            raise PlanError(f"step for unknown request {request_id!r}")
        seq.block_ids.extend(step.new_block_ids)
        start, end = seq.num_computed, seq.num_computed + num_tokens
        missing = end - len(seq.tokens)
        if 0 < missing <= len(step.token_ids):  # sampled on the last pipeline stage
            seq.tokens.extend(step.token_ids[len(step.token_ids) - missing :])
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
        return SequenceChunk(seq.tokens[start:end], start, seq.block_ids.array())

    # ------------------------------------------------------------------ execute

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan to completion: its sampled tokens are on the host when this returns."""
        return self.finish(self.launch(plan))

    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue a plan's work on the device and return without reading its tokens.

        The sequences' bookkeeping advances at once: each sampled token is a placeholder in
        ``Sequence.tokens`` until ``finish``; a later plan that steps such a sequence takes the
        token from the device (the forward reads it there), so the next plan can be launched
        while this one is still on the GPU. ``finish`` the steps in launch order.
        """
        started = time.perf_counter()
        for request_id in plan.finished:
            self._forget(request_id)
        self._copy_blocks(plan.copies)
        for new in plan.new:
            self._register(new)
        timing = StepTiming()
        if not plan.steps:
            return LaunchedStep(plan, started, timing)
        ids = [s.request_id for s in plan.steps]
        if len(set(ids)) != len(ids):
            raise PlanError(f"plan {plan.iteration} steps a request more than once: {ids}")
        chunks = [self._chunk(s) for s in plan.steps]
        batch = self.runner.build_batch(chunks)
        if not self.samples:
            return self._pass_on(plan, batch, started, timing)
        pending = self._pending_inputs(ids, chunks)
        if pending is not None:
            batch.input_ids = self._with_pending_tokens(batch.input_ids, pending)
        seqs = [self.sequences[i] for i in ids]
        ready_rows = [
            row
            for row, (seq, step) in enumerate(zip(seqs, plan.steps, strict=True))
            if seq.num_computed + step.num_tokens == len(seq.tokens)
        ]
        ready = [seqs[r] for r in ready_rows] if len(ready_rows) != len(seqs) else seqs
        plain = all(is_plain_greedy(s.sampling) and not s.adjusts for s in ready)
        # Every host-to-device copy of the step goes before the forward: a copy from pageable
        # memory waits on the host until its stream has drained, so after the launch it would
        # hold the host for the whole forward.
        sampling = None if plain else self._prepare_sampling(ready_rows, ready, len(seqs))
        index = None
        if plain and ready and len(ready_rows) != len(seqs):
            index = self._upload_rows(ready_rows)
        timing.prepare = time.perf_counter()
        cuda = self.runner.device.type == "cuda"
        events = self._timing_events() if self.time_forwards and cuda else None
        if events is not None:
            events[0].record()
        inputs = None
        if self.link is not None and not self.runner.stage.is_first:
            inputs = self.link.recv(plan.iteration, batch.num_tokens)
        logits, greedy = self.runner.forward_greedy(batch, graphs=self.graph_kind, inputs=inputs)
        if events is not None:
            events[1].record()
            self.forward_events = events
        timing.forward = time.perf_counter()
        for seq, step in zip(seqs, plan.steps, strict=True):
            seq.num_computed += step.num_tokens
        out = None
        if not ready:
            tokens = None
        elif plain:
            tokens = greedy if greedy is not None else logits.argmax(dim=-1)
            if index is not None:
                tokens = tokens.index_select(0, index)
        else:
            index, batch_sampling = sampling
            out = sample(logits if index is None else logits.index_select(0, index), batch_sampling)
            if batch_sampling.adjustments is not None:
                batch_sampling.adjustments.record(out.token_ids)
            tokens = out.token_ids
        launched = LaunchedStep(plan, started, timing, ready, tokens, forward_events=events)
        if ready:
            positions = []
            for row, seq in enumerate(ready):
                positions.append(len(seq.tokens))
                seq.tokens.append(PENDING_TOKEN)
                seq.num_output_tokens += 1
                self._pending[seq.request_id] = (launched, row)
            launched.positions = positions
            launched.read_back(out, cuda)
        timing.sample = time.perf_counter()
        return launched

    def finish(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched plan's tokens and settle them into the sequences."""
        plan, timing = launched.plan, launched.timing
        if not plan.steps:
            return StepResult(iteration=plan.iteration, flow=plan.flow)
        t0 = time.perf_counter()
        sampled: list[SampledToken] = []
        if launched.ready:
            token_ids, logprobs = launched.host_values()
            timing.wait = time.perf_counter() - t0
            pending = self._pending
            for i, (seq, pos, token) in enumerate(
                zip(launched.ready, launched.positions, token_ids, strict=True)
            ):
                seq.tokens[pos] = token
                if pending.get(seq.request_id, (None,))[0] is launched:
                    del pending[seq.request_id]
                lp = None
                if logprobs is not None and seq.sampling.logprobs > 0:
                    n = seq.sampling.logprobs
                    lp = TokenLogprobs(logprobs[0][i], logprobs[1][i][:n], logprobs[2][i][:n])
                sampled.append(SampledToken(seq.request_id, token, lp))
            if self.on_sequence_ready is not None:
                for seq in launched.ready:
                    self.on_sequence_ready(seq)
        done = time.perf_counter()
        timing.result = done - t0 - timing.wait
        self.last_timing = timing.phases(launched.started, done)
        return StepResult(
            iteration=plan.iteration,
            sampled=sampled,
            flow=plan.flow,
            duration_s=done - launched.started,
        )

    # ------------------------------------------------------------------ launch helpers

    def _pass_on(
        self, plan: StepPlan, batch: ForwardBatch, started: float, timing: StepTiming
    ) -> LaunchedStep:
        """A pipeline stage before the last: run its layers and send the activations on."""
        if self.link is None:
            raise PlanError("a pipeline stage before the last needs a link to the next stage")
        inputs = None
        if not self.runner.stage.is_first:
            inputs = self.link.recv(plan.iteration, batch.num_tokens)
        timing.prepare = time.perf_counter()
        hidden, residual = self.runner.forward(batch, graphs="none", inputs=inputs)
        self.link.send(plan.iteration, hidden, residual)
        timing.forward = timing.sample = time.perf_counter()
        for step in plan.steps:
            self.sequences[step.request_id].num_computed += step.num_tokens
        return LaunchedStep(plan, started, timing)

    def _pending_inputs(self, ids: list[str], chunks: list[SequenceChunk]) -> PendingInputs | None:
        """Flat token positions of the batch whose token is still on the device, and the rows
        of the launched step that sampled them (None when every token is known). A pending
        token is always its sequence's last, so only a chunk's last token can be one."""
        at, flat, rows, source = 0, [], [], None
        pending = self._pending
        for request_id, chunk in zip(ids, chunks, strict=True):
            n = len(chunk.token_ids)
            at += n
            if chunk.token_ids[-1] != PENDING_TOKEN:
                continue
            entry = pending.get(request_id)
            if entry is None:
                raise PlanError(f"request {request_id!r}: a token no launched step samples")
            step, row = entry
            if step.positions[row] != chunk.num_cached + n - 1:
                raise PlanError(f"request {request_id!r}: a pending token out of place")
            if source is not None and step is not source:
                raise PlanError("a plan reads tokens of two unfinished steps")
            source = step
            flat.append(at - 1)
            rows.append(row)
        if source is None:
            return None
        return PendingInputs(flat, rows, source)

    def _with_pending_tokens(self, input_ids: torch.Tensor, pending: PendingInputs) -> torch.Tensor:
        device = input_ids.device
        (flat, rows), _ = upload_packed(
            [np.asarray(pending.flat, dtype=np.int64), np.asarray(pending.rows, dtype=np.int64)],
            [],
            device,
        )
        return input_ids.index_put((flat,), pending.source.tokens.index_select(0, rows))

    def _upload_rows(self, rows: list[int]) -> torch.Tensor:
        (index,), _ = upload_packed([np.asarray(rows, dtype=np.int64)], [], self.runner.device)
        return index

    def _timing_events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _prepare_sampling(
        self, rows: list[int], seqs: list[Sequence], num_rows: int
    ) -> tuple[torch.Tensor | None, SamplingBatch] | None:
        """(rows of the logits to sample, or None for all; the sampling batch), on the device."""
        if not seqs:
            return None
        device = self.runner.device
        index = None
        if len(rows) != num_rows:
            index = self._upload_rows(rows)
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


PENDING_TOKEN = -1  # a sampled token the host has not read yet (``Sequence.tokens``)


@dataclass
class StepTiming:
    """Host-side marks of one step (perf_counter seconds; ``wait``/``result`` durations)."""

    prepare: float = 0.0  # inputs built and their copies queued
    forward: float = 0.0  # forward launched (graph replayed or eager kernels queued)
    sample: float = 0.0  # sampling and the device-to-host copy of the tokens queued
    wait: float = 0.0  # seconds finish() waited for the tokens
    result: float = 0.0  # seconds finish() spent settling tokens and building the result

    def phases(self, started: float, done: float) -> dict[str, float]:
        """Milliseconds per phase of the step that started at ``started``."""
        if not self.prepare:
            return {}
        return {
            "prepare_ms": (self.prepare - started) * 1e3,
            "forward_launch_ms": (self.forward - self.prepare) * 1e3,
            "sample_launch_ms": (self.sample - self.forward) * 1e3,
            "token_wait_ms": self.wait * 1e3,
            "result_ms": self.result * 1e3,
            "step_ms": (done - started) * 1e3,
        }


@dataclass
class PendingInputs:
    flat: list[int]  # positions in the batch's flat token list
    rows: list[int]  # the source step's sampled-token rows
    source: LaunchedStep


@dataclass
class LaunchedStep:
    """A plan queued on the device; ``PlanExecutor.finish`` turns it into its result."""

    plan: StepPlan
    started: float
    timing: StepTiming
    ready: list[Sequence] = field(default_factory=list)  # sequences that sample a token
    tokens: torch.Tensor | None = None  # [len(ready)] int64 on the device
    positions: list[int] = field(default_factory=list)  # each token's index in its sequence
    # CUDA events around its forward when the executor times forwards (``time_forwards``)
    forward_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
    _host: list[torch.Tensor] = field(default_factory=list)
    _done: torch.cuda.Event | None = None

    def read_back(self, out: SamplerOutput | None, cuda: bool) -> None:
        """Queue the copies of the tokens (and log-probs) to pinned host memory."""
        values = [self.tokens]
        if out is not None and out.top_ids is not None:
            values += [out.token_logprobs, out.top_ids, out.top_logprobs]
        if not cuda:
            self._host = values
            return
        for v in values:
            host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host.copy_(v, non_blocking=True)
            self._host.append(host)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> None:
        """Block until the tokens are on the host (releases the GIL while waiting)."""
        if self._done is not None:
            self._done.synchronize()

    def host_values(self) -> tuple[list[int], tuple[list, list, list] | None]:
        self.wait()
        tokens = self._host[0].tolist()
        if len(self._host) == 1:
            return tokens, None
        return tokens, (self._host[1].tolist(), self._host[2].tolist(), self._host[3].tolist())
