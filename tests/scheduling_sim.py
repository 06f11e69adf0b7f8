"""A deterministic in-memory node for driving SchedulerCore: the real KVCacheManager, and fake
engines that execute plans like PlanExecutor does but sample token = f(request id, position).

Engines record in a shared KV "pool" a fingerprint of the token prefix each slot's KV stands
for, and check every slot they read: a plan that reads a block nobody wrote, a block reused
too early, or a wrongly shared prefix fails loudly. tests/test_scheduling_sim.py checks
that the fakes catch such plans; the scheduling tests import this module by name.
"""

from __future__ import annotations

import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field

from greenroom.actors.scheduling import FlowBudget, SchedulerCore
from greenroom.actors.scheduling.routing import PromptRouting
from greenroom.bus.messages import (
    HandoffEvent,
    KVStepResult,
    NewSequence,
    OutputBatch,
    SampledToken,
    SamplingParams,
    SequenceStep,
    StepPlan,
    StepResult,
    SubmitRequest,
)
from greenroom.config import KVConfig, SchedulerConfig
from greenroom.kv import KVCacheManager

EOS = 0


def fake_token(request_id: str, position: int, vocab: int) -> int:
    return zlib.crc32(f"{request_id}:{position}".encode()) % vocab


def expected_output(
    request_id: str, prompt_len: int, sp: SamplingParams, vocab: int, max_model_len: int
) -> tuple[list[int], str]:
    """What any correct schedule streams for this request with the fake engine."""
    out: list[int] = []
    limit = min(sp.max_tokens, max_model_len - prompt_len)
    while True:
        t = fake_token(request_id, prompt_len + len(out), vocab)
        out.append(t)
        if t in sp.stop_token_ids or (not sp.ignore_eos and t == EOS):
            return out, "stop"
        if len(out) >= limit:
            return out, "length"


def _fp(prev: int, token: int) -> int:
    return zlib.crc32(f"{prev}:{token}".encode())


@dataclass
class SimSeq:
    tokens: list[int]
    num_computed: int
    block_ids: list[int]
    num_output: int
    fps: list[int] = field(default_factory=list)  # fingerprint of tokens[: i + 1]

    def fingerprint(self, pos: int) -> int:
        while len(self.fps) <= pos:
            prev = self.fps[-1] if self.fps else 0
            self.fps.append(_fp(prev, self.tokens[len(self.fps)]))
        return self.fps[pos]


class SimEngine:
    """Executes StepPlans in order: `finished`, `copies`, `new`, then the steps."""

    def __init__(self, flow: str, pool: dict, host: dict, tpb: int, vocab: int) -> None:
        self.flow, self.pool, self.host, self.tpb, self.vocab = flow, pool, host, tpb, vocab
        self.seqs: dict[str, SimSeq] = {}
        self.next_event = 1
        self.handoff_ids: dict[str, int] = {}

    def slot(self, seq: SimSeq, pos: int) -> tuple[int, int]:
        return seq.block_ids[pos // self.tpb], pos % self.tpb

    def execute(self, plan: StepPlan) -> StepResult:
        assert plan.flow == self.flow
        for rid in plan.finished:
            self.seqs.pop(rid, None)
        self.copy_blocks(plan)
        for new in plan.new:
            self.register(new)
        ids = [s.request_id for s in plan.steps]
        assert len(set(ids)) == len(ids), f"a request twice in plan {plan.iteration}"
        sampled, handoffs = [], []
        for step in plan.steps:
            if self.run_step(step):
                seq = self.seqs[step.request_id]
                token = fake_token(step.request_id, len(seq.tokens), self.vocab)
                seq.tokens.append(token)
                seq.num_output += 1
                sampled.append(SampledToken(step.request_id, token))
                if self.flow == "context":
                    handoffs.append(HandoffEvent(step.request_id, self.next_event))
                    self.handoff_ids[step.request_id] = self.next_event
                    self.next_event += 1
        return StepResult(
            iteration=plan.iteration, sampled=sampled, handoffs=handoffs, flow=self.flow
        )

    def copy_blocks(self, plan: StepPlan) -> None:
        for c in plan.copies:
            if c.kind == "offload":
                self.host[c.dst] = {s: self.pool.get((c.src, s)) for s in range(self.tpb)}
            else:
                for s, v in self.host[c.src].items():
                    self.pool[(c.dst, s)] = v

    def register(self, new: NewSequence) -> None:
        n = len(new.prompt_token_ids)
        assert new.request_id not in self.seqs, f"{new.request_id} registered twice"
        assert 0 <= new.num_cached_tokens < n and 0 <= new.num_output_tokens < n
        seq = SimSeq(list(new.prompt_token_ids), new.num_cached_tokens, list(new.block_ids), 0)
        seq.num_output = new.num_output_tokens
        self.seqs[new.request_id] = seq

    def run_step(self, step: SequenceStep) -> bool:
        seq = self.seqs.get(step.request_id)
        assert seq is not None, f"{self.flow}: step for unknown request {step.request_id}"
        seq.block_ids.extend(step.new_block_ids)
        start, end = seq.num_computed, seq.num_computed + step.num_tokens
        assert step.num_tokens >= 1 and end <= len(seq.tokens), (step, start, len(seq.tokens))
        assert end <= len(seq.block_ids) * self.tpb, f"{step.request_id}: block table too short"
        for pos in range(start):  # attention reads every earlier position
            got = self.pool.get(self.slot(seq, pos))
            assert got == seq.fingerprint(pos), f"{step.request_id}: wrong KV at {pos}"
        for pos in range(start, end):
            self.pool[self.slot(seq, pos)] = seq.fingerprint(pos)
        seq.num_computed = end
        return end == len(seq.tokens)


class Sim:
    """One node: core + real KV manager + one fake engine per flow, stepped by hand."""

    def __init__(
        self,
        flows: list[FlowBudget],
        num_blocks: int = 256,
        tpb: int = 4,
        vocab: int = 64,
        max_model_len: int = 256,
        host_blocks: int = 0,
        prefix_reuse: bool = True,
        routing: PromptRouting | None = None,
        **sched,
    ) -> None:
        self.cfg = SchedulerConfig(**sched)
        self.core = SchedulerCore(self.cfg, tpb, max_model_len, [EOS], flows, routing=routing)
        kv_cfg = KVConfig(
            tokens_per_block=tpb, host_blocks=host_blocks, enable_prefix_reuse=prefix_reuse
        )
        self.kv = KVCacheManager(kv_cfg, num_blocks)
        pool: dict = {}
        host: dict = {}
        self.engines = {f.name: SimEngine(f.name, pool, host, tpb, vocab) for f in flows}
        self.budgets = {f.name: f for f in flows}
        self.vocab, self.max_model_len = vocab, max_model_len
        self.kv_results: dict[str, KVStepResult] = {}
        self.queued: dict[str, deque[StepPlan]] = defaultdict(deque)  # issued, not run
        self.results: dict[str, deque[StepResult]] = defaultdict(deque)  # run, not applied
        self.plans: list[StepPlan] = []
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.final: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.prompts: dict[str, int] = {}
        self.sampling: dict[str, SamplingParams] = {}

    # -------------------------------------------------------------- requests

    def submit(self, rid: str, prompt: list[int], **sampling) -> None:
        sp = SamplingParams(**sampling)
        self.prompts[rid], self.sampling[rid] = len(prompt), sp
        self.core.submit(SubmitRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp))

    def cancel(self, rids: list[str], reason: str = "abort") -> None:
        self.record(self.core.cancel(rids, reason))

    def expected(self, rid: str) -> tuple[list[int], str]:
        return expected_output(
            rid, self.prompts[rid], self.sampling[rid], self.vocab, self.max_model_len
        )

    # -------------------------------------------------------------- the four moves

    def build(self, flow: str) -> bool:
        """Build a KVStep and let the KV manager answer it (it answers in send order)."""
        if flow in self.kv_results:
            return False
        step = self.core.build_kv_step(flow)
        if step is None:
            return False
        self.kv_results[flow] = self.kv.step(step)
        return True

    def apply_kv(self, flow: str) -> StepPlan | None:
        plan = self.core.apply_kv_result(flow, self.kv_results.pop(flow))
        orphans = self.core.take_output()
        if orphans is not None:
            self.record(orphans)
        if plan is not None:
            b = self.budgets[flow]
            assert sum(s.num_tokens for s in plan.steps) <= b.max_num_tokens
            assert len(plan.steps) <= b.max_batch_size
            self.queued[flow].append(plan)
            self.plans.append(plan)
        return plan

    def run_engine(self, flow: str) -> bool:
        if not self.queued[flow]:
            return False
        self.results[flow].append(self.engines[flow].execute(self.queued[flow].popleft()))
        return True

    def apply_step(self, flow: str) -> bool:
        if not self.results[flow]:
            return False
        self.record(self.core.apply_step_result(flow, self.results[flow].popleft()))
        return True

    def record(self, out: OutputBatch) -> None:
        for d in out.deltas:
            assert d.request_id not in self.final, f"{d.request_id}: tokens after its end"
            self.tokens[d.request_id].extend(d.token_ids)
            if d.finish_reason is not None:
                self.final[d.request_id] = d.finish_reason
                assert d.metrics is not None
                assert d.metrics.num_output_tokens == len(self.tokens[d.request_id])
        for e in out.errors:
            assert e.request_id not in self.final, f"{e.request_id}: error after its end"
            self.final[e.request_id] = f"error:{e.kind}"
            self.errors[e.request_id] = e.message

    # -------------------------------------------------------------- driving

    def iterate(self, flow: str) -> bool:
        """What the actor does once: fill the flight window, then run and consume one plan."""
        moved = False
        while self.core.inflight(flow) < self.cfg.plans_in_flight and self.core.has_work(flow):
            self.build(flow)
            moved = True
            if self.apply_kv(flow) is None:
                break
        if self.run_engine(flow):
            moved = True
        if self.apply_step(flow):
            moved = True
        return moved

    def run(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            moved = False
            for flow in self.budgets:
                moved |= self.iterate(flow)
            self.check()
            if not moved:
                return
        raise AssertionError("the schedule did not drain")

    def check(self) -> None:
        self.kv.check_invariants()
        cap = self.cfg.max_num_active_requests
        assert self.core.num_active <= cap
        assert len(self.kv.requests) <= cap
        flows = list(self.budgets)
        sel = self.core._selector
        for f in flows:  # the cheap answer the actor asks for matches the full selection
            assert sel.has_work(f, self.core.num_active) == bool(
                sel.select(f, self.core.num_active)
            ), f"flow {f}: has_work disagrees with select"
        if len(flows) == 2:
            a, b = (self.inflight_ids(f) for f in flows)
            assert not a & b, f"in both flows: {a & b}"

    def inflight_ids(self, flow: str) -> set[str]:
        return {e.request.request_id for p in self.core._inflight[flow] for e in p.entries}

    def drained(self) -> None:
        """Everything finished and every block is back (idle in the prefix cache or free)."""
        assert self.core.num_active == 0 and self.core.num_waiting == 0
        assert not self.kv.requests
        assert self.kv.num_free_blocks == self.kv.total_blocks


def mixed(tokens: int = 64, batch: int = 8) -> list[FlowBudget]:
    return [FlowBudget("mixed", tokens, batch)]


def two_flows(ctx: int = 32, ctx_batch: int = 4, gen: int = 16, gen_batch: int = 8):
    return [FlowBudget("context", ctx, ctx_batch), FlowBudget("generation", gen, gen_batch)]


def prompt(seed: int, n: int) -> list[int]:
    """A deterministic prompt of ``n`` tokens in [1, 50]."""
    return [1 + (seed * 31 + i * 7) % 50 for i in range(n)]


class StageEngine(SimEngine):
    """One pipeline stage: its own KV pool (its layers), the plans in order; only the last
    stage samples, the others take each decode's input token from the plan."""

    def __init__(self, pool: dict, host: dict, tpb: int, vocab: int, last: bool) -> None:
        super().__init__("mixed", pool, host, tpb, vocab)
        self.last = last
        self.ran: list[int] = []  # plan iterations, in the order this stage ran them

    def execute(self, plan: StepPlan) -> StepResult:
        self.ran.append(plan.iteration)
        if self.last:
            return super().execute(plan)
        for rid in plan.finished:
            self.seqs.pop(rid, None)
        self.copy_blocks(plan)
        for new in plan.new:
            self.register(new)
        for step in plan.steps:
            seq = self.seqs[step.request_id]
            missing = seq.num_computed + step.num_tokens - len(seq.tokens)
            if missing > 0:
                assert len(step.token_ids) >= missing, f"{step}: no sampled input token"
                seq.tokens.extend(step.token_ids[len(step.token_ids) - missing :])
            self.run_step(step)
        return StepResult(iteration=plan.iteration)


class PipelineSim(Sim):
    """A pipelined node: the core keeps up to ``depth`` disjoint micro-batches in flight; each
    goes through ``stages`` stages in order (each stage runs plans FIFO, as torch.distributed
    send/recv pairs them); results reach the core whenever the driver delivers them."""

    def __init__(self, flows: list[FlowBudget], stages: int, depth: int, **kw) -> None:
        super().__init__(flows, **kw)
        tpb = self.kv.tokens_per_block
        self.core = SchedulerCore(self.cfg, tpb, self.max_model_len, [EOS], flows, pipelined=True)
        self.depth = depth
        self.stages = [
            StageEngine({}, {}, tpb, self.vocab, last=k == stages - 1) for k in range(stages)
        ]
        self.stage_queues: list[deque[StepPlan]] = [deque() for _ in range(stages)]
        self.done: list[StepResult] = []  # sampled by the last stage, not yet delivered
        self.max_inflight = 0
        self.kv_steps = 0  # KVSteps built (progress even when no plan comes of one)

    def issue(self) -> int:
        """Issue every micro-batch that can be built now (never waits on a result)."""
        issued = 0
        while self.core.inflight("mixed") < self.depth and self.core.has_work("mixed"):
            self.build("mixed")
            self.kv_steps += 1
            plan = self.apply_kv("mixed")
            if plan is None:
                break  # only frees, or nothing admitted: the next round goes on
            self.queued["mixed"].clear()
            self.stage_queues[0].append(plan)
            issued += 1
        self.max_inflight = max(self.max_inflight, self.core.inflight("mixed"))
        return issued

    def advance(self, k: int) -> bool:
        """Stage ``k`` runs its oldest micro-batch and passes it on."""
        if not self.stage_queues[k]:
            return False
        plan = self.stage_queues[k].popleft()
        result = self.stages[k].execute(plan)
        if k + 1 < len(self.stages):
            self.stage_queues[k + 1].append(plan)
        else:
            self.done.append(result)
        return True

    def deliver(self, index: int = 0) -> bool:
        if not self.done:
            return False
        self.record(self.core.apply_step_result("mixed", self.done.pop(index % len(self.done))))
        return True

    def check(self) -> None:
        super().check()
        ids = [e.request.request_id for p in self.core._inflight["mixed"] for e in p.entries]
        assert len(ids) == len(set(ids)), f"a request in two micro-batches: {ids}"
        assert self.core.inflight("mixed") <= self.depth

    def run(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            before = self.kv_steps
            self.issue()
            moved = self.kv_steps > before
            for k in reversed(range(len(self.stages))):
                moved |= self.advance(k)
            moved |= self.deliver()
            self.check()
            if not moved:
                return
        raise AssertionError("the pipeline did not drain")


TWO_FLOWS = ("context", "generation")
RANDOM_MOVES = ("build", "apply_kv", "run_engine", "apply_step", "submit", "cancel")


def run_random_interleaving(
    sim: Sim, data, num_blocks: int, in_flight: int
) -> list[tuple[int, int]]:
    """Drive ``sim``'s two flows through a hypothesis-drawn sequence of submits, cancels,
    plan builds and engine steps, checking the invariants after each, then run it to the end
    and check every request's tokens (a cancelled one: a prefix of them). Returns the drawn
    (prompt, output) lengths; request ``rI`` has the I-th."""
    from hypothesis import strategies as st

    usable_tokens = (num_blocks - 1) * 4
    lengths = data.draw(
        st.lists(st.tuples(st.integers(1, 20), st.integers(1, 16)), min_size=3, max_size=10)
    )
    pending = [(f"r{i}", n, m) for i, (n, m) in enumerate(lengths) if n + m <= usable_tokens]
    cancelled: set[str] = set()
    ops = data.draw(
        st.lists(
            st.tuples(st.sampled_from(RANDOM_MOVES), st.sampled_from(TWO_FLOWS)),
            min_size=20,
            max_size=200,
        )
    )
    for move, flow in ops:
        if move == "submit" and pending:
            rid, n, m = pending.pop(0)
            sim.submit(rid, prompt(int(rid[1:]), n), max_tokens=m, ignore_eos=n % 2 == 0)
        elif move == "cancel" and sim.prompts:
            rid = data.draw(st.sampled_from(sorted(sim.prompts)))
            if rid not in sim.final:
                cancelled.add(rid)
            sim.cancel([rid])
        elif move == "build":
            if sim.core.inflight(flow) < in_flight and sim.core.has_work(flow):
                sim.build(flow)
        elif move == "apply_kv":
            if flow in sim.kv_results:
                sim.apply_kv(flow)
        elif move == "run_engine":
            sim.run_engine(flow)
        elif move == "apply_step":
            sim.apply_step(flow)
        sim.check()
    for rid, n, m in pending:
        sim.submit(rid, prompt(int(rid[1:]), n), max_tokens=m, ignore_eos=n % 2 == 0)
    for flow in TWO_FLOWS:
        if flow in sim.kv_results:
            sim.apply_kv(flow)
    sim.run()
    for rid in sim.prompts:
        if rid in cancelled:
            assert sim.final[rid] == "abort"
            expected = sim.expected(rid)[0]
            assert sim.tokens[rid] == expected[: len(sim.tokens[rid])]
        else:
            assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid), rid
    return lengths
