"""The scheduler's core: request state across plan flows, with no I/O.

The scheduler actor drives it per flow: ``build_kv_step`` -> (KV manager) ->
``apply_kv_result`` -> StepPlan -> (engine) -> ``apply_step_result`` -> OutputBatch.
Plans are built ahead of results: every scheduled decode is assumed to sample one token.
Each method leaves the state consistent, so two flows may interleave calls freely.

Pipelined (pipeline parallelism): a request is in at most one issued plan (micro-batch), so
plans in flight are disjoint, stage 0 gets each decode's input token in the plan
(``SequenceStep.token_ids``: it never sees the last stage's sampling), and results may be
applied in any order.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque

from greenroom.actors.scheduling.admission_routing import routed_flows
from greenroom.actors.scheduling.budget import FlowBudget, check_flows
from greenroom.actors.scheduling.flight import Draft, IssuedPlan, PlanEntry, take_issued
from greenroom.actors.scheduling.head_rejection import HeadRejection
from greenroom.actors.scheduling.outputs import ERROR_KINDS, OutputCollector, Undelivered
from greenroom.actors.scheduling.plan_steps import count_plan, fill_plan, sequence_step
from greenroom.actors.scheduling.planner import admit_for, extend_for
from greenroom.actors.scheduling.receives import KVReceives
from greenroom.actors.scheduling.request import FreeState, KVWait, Request, RequestState
from greenroom.actors.scheduling.routing import PromptRouting
from greenroom.actors.scheduling.samples import SampleGroups
from greenroom.actors.scheduling.selection import FlowSelector
from greenroom.bus.messages import (
    KVComputed,
    KVReceive,
    KVStep,
    KVStepResult,
    OutputBatch,
    StepPlan,
    StepResult,
    SubmitRequest,
)
from greenroom.config import SchedulerConfig


class SchedulerCore:
    """Request state machine and plan builder for one ``mixed`` flow or two SM-disagg flows."""

    def __init__(
        self,
        sched_cfg: SchedulerConfig,
        tokens_per_block: int,
        max_model_len: int,
        eos_token_ids: list[int],
        flows: list[FlowBudget],
        pipelined: bool = False,
        routing: PromptRouting | None = None,
    ) -> None:
        """``routing`` (two flows only): under ``adaptive`` each admission goes to the flow
        ``route_prompts`` picks, short prompts riding in the generation flow's steps."""
        self.cfg = sched_cfg
        self.pipelined = pipelined
        self.tokens_per_block = tokens_per_block
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.flows, self.routing = routed_flows(check_flows(flows), routing)
        self._requests: dict[str, Request] = {}  # every request not yet gone (blocks included)
        self._waiting: OrderedDict[str, Request] = OrderedDict()
        self._running: dict[str, Request] = {}  # admission order: the last is the newest
        self._free_ready: dict[str, Request] = {}
        self._preempting: dict[str, Request] = {}  # preempted, old blocks not yet freed
        self._finished_ids: dict[str, list[str]] = {f: [] for f in self.flows}
        self._drafts: dict[str, Draft] = {}
        self._inflight: dict[str, deque[IssuedPlan]] = {f: deque() for f in self.flows}
        self._undelivered = Undelivered()
        self._samples = SampleGroups()
        self._counters: Counter[str] = Counter()
        self._receives = KVReceives(
            self._settle, self._fail, self._counters, self._undelivered.transfers
        )
        self._head = HeadRejection()
        queues = (self._waiting, self._running, self._drafts)
        self._selector = FlowSelector(
            self.flows,
            sched_cfg.max_num_active_requests,
            pipelined,
            self.routing,
            queues,
            self._head,
        )
        self._num_active = 0
        self._iteration = 0
        self._drop_cache = False  # the next KVStep tells the KV manager to forget cached KV
        self._admit_seq = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_active(self) -> int:
        """Admitted requests whose blocks are not freed yet (both flows, handoffs included)."""
        return self._num_active

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def inflight(self, flow: str) -> int:
        """Plans of ``flow`` issued whose result has not come back."""
        return len(self._inflight[flow])

    def has_work(self, flow: str) -> bool:
        """Whether ``build_kv_step(flow)`` would return a step now."""
        if flow in self._drafts:
            return False
        return (
            bool(self._free_ready)
            or self._receives.has_work()
            or self._selector.has_work(flow, self._num_active)
        )

    def stats(self) -> dict:
        running = Counter(r.flow for r in self._running.values())
        return {
            "waiting": self.num_waiting,
            "active": self._num_active,
            "running": dict(running),
            "inflight": {f: len(q) for f, q in self._inflight.items()},
            "waiting_for_kv": self._receives.num_reading,
            **self._counters,
        }

    def request_state(self, request_id: str) -> RequestState | None:
        r = self._requests.get(request_id)
        return r.state if r is not None else None

    # ------------------------------------------------------------------ requests in and out

    def submit(self, req: SubmitRequest) -> None:
        """Queue a request (FCFS). Raises ValueError for a duplicate id or an unusable request.

        A request with ``n > 1`` becomes n samples; all but the first wait until the first's
        prompt is scheduled, so that they are admitted onto its cached prompt blocks.
        """
        if req.request_id in self._requests or req.request_id in self._samples:
            raise ValueError(f"request {req.request_id!r} is already in the scheduler")
        samples = self._samples.split(req, self.max_model_len)
        for r in samples:
            if r.request_id in self._requests:
                raise ValueError(f"request {r.request_id!r} is already in the scheduler")
        for r in samples:
            self._requests[r.request_id] = r
        if req.kv_handle is not None:
            self._receives.pending(req.request_id, req.kv_handle)
        self._waiting[samples[0].request_id] = samples[0]
        self._samples.add(samples)
        self._counters["submitted"] += 1

    def cancel(self, request_ids: list[str], reason: str = "abort") -> OutputBatch:
        """End requests (every sample of an n > 1 request named by the client's id):
        ``abort`` gives a final delta, ``stop`` (a stop string the frontend matched) finishes
        the request with one, any other reason gives a RequestError."""
        out = self._collector()
        for r in [r for rid in request_ids for r in self._samples.members(rid, self._requests)]:
            if r.state.terminal:
                continue
            if reason == "stop":
                self._end(r, RequestState.FINISHED, "stop")
                out.final(r, "stop")
                continue
            self._end(r, RequestState.ABORTED, "abort")
            if reason == "abort":
                out.final(r, "abort")
            else:
                kind = reason if reason in ERROR_KINDS else "aborted"
                out.error(r, kind, f"request {reason}")
        return self._finish(out)

    def expired(self, now: float, timeout_s: float) -> list[str]:
        """Live requests that arrived more than ``timeout_s`` before ``now``."""
        limit = now - timeout_s
        return [
            rid
            for rid, r in self._requests.items()
            if not r.state.terminal and r.arrival_time and r.arrival_time < limit
        ]

    def take_output(self) -> OutputBatch | None:
        """Errors decided outside a step result (a prompt that can never fit), if any."""
        if not self._undelivered:
            return None
        return self._collector().batch()

    # ------------------------------------------------------------------ one iteration

    def build_kv_step(self, flow: str) -> KVStep | None:
        """The KV changes one iteration of ``flow`` needs; None when there is nothing to do."""
        if flow in self._drafts:
            raise RuntimeError(f"flow {flow!r} already has a KVStep awaiting its result")
        sel = self._selector.select(flow, self._num_active)
        frees = list(self._free_ready.values())
        if not sel and not frees and not self._receives.has_work():
            return None
        self._free_ready.clear()
        self._iteration += 1
        step = KVStep(
            iteration=self._iteration,
            free=[r.kv_free for r in frees],
            computed=self._computed(),
            extend=[e for r, n in sel.steps if (e := extend_for(r, n, self.tokens_per_block))],
            admit=[admit_for(r, self.cfg.capacity_policy) for r in sel.admits],
            transfers=self._receives.take_updates(),
            drop_cache=self._drop_cache,
        )
        self._drop_cache = False
        for r in frees:
            r.free_state = FreeState.SENT
        draft = Draft(flow, step, [(r, r.epoch, n) for r, n in sel.steps], sel.admits, frees)
        draft.hold(+1)
        self._drafts[flow] = draft
        return step

    def apply_kv_result(self, flow: str, result: KVStepResult) -> StepPlan | None:
        """Finish the plan of the KVStep ``result`` answers; None when it carries nothing."""
        draft = self._drafts.get(flow)
        if draft is None or draft.iteration != result.iteration:
            raise ValueError(f"flow {flow!r}: no KVStep of iteration {result.iteration} is pending")
        del self._drafts[flow]
        for r in draft.frees:
            self._freed(r)
        stepping = {r.request_id: r for r, _, _ in draft.steps}
        for rid, blocks in result.extended.items():
            r = stepping.get(rid)
            if r is not None and r.free_state is FreeState.NONE:
                r.block_ids.extend(blocks)
        newly = self._admit(flow, draft, result)
        self._undelivered.handles.extend(result.handles)
        receives = [rc for rc in result.receives if self._receives.start(rc, self._requests)]
        if any(rid in stepping and stepping[rid].live for rid in result.failed_extend):
            self._preempt_newest()
        entries = fill_plan(self.flows[flow], draft, newly, set(result.failed_extend))
        draft.hold(-1)
        for e in entries:
            e.request.holds += 1
        for r in draft.held():
            self._settle(r)
        cancels = self._receives.take_cancels()
        if not entries and not result.copies and not receives and not cancels:
            if not self._receives.num_reading:
                return None
            # async receives: an empty plan lets the engine check its reads
        return self._issue(flow, result, entries, receives, cancels)

    def apply_step_result(self, flow: str, result: StepResult) -> OutputBatch:
        """Take the engine's sampled tokens: stream them, stop requests, hand off to generation."""
        plan = take_issued(self._inflight[flow], result.iteration, self.pipelined)
        if plan is None:
            raise ValueError(f"flow {flow!r}: no plan of iteration {result.iteration} in flight")
        out = self._collector()
        for u in result.transfers:
            self._receives.settled(u, out)
        sampled = {s.request_id: s for s in result.sampled}
        handoffs = {h.request_id: h.event_id for h in result.handoffs}
        for e in plan.entries:
            r = e.request
            if not e.current or not r.live:
                continue  # finished, cancelled or preempted since the plan was built
            if result.error is not None:
                self._fail(r, out, f"engine error: {result.error}")
                continue
            if r.request_id in result.failed:
                self._fail(r, out, f"engine error: {result.failed[r.request_id]}")
                continue
            if not e.samples:
                continue
            r.pending_samples -= 1
            s = sampled.get(r.request_id)
            if s is None:
                self._fail(r, out, "the engine returned no token for this request")
                continue
            r.output.append(s.token_id)
            self._counters["output_tokens"] += 1
            reason = r.stop_reason(s.token_id, self.eos_token_ids)
            if reason is not None:
                self._end(r, RequestState.FINISHED, reason)
            elif r.lease_kv:  # context role: the blocks go to a lease, the rest elsewhere
                r.leasing = True
                self._end(r, RequestState.FINISHED, None)
            out.token(r, s.token_id, s.logprobs)
            if reason is None and flow == "context":
                self._handoff(r, handoffs.get(r.request_id, 0))
        plan.release()
        for e in plan.entries:
            self._settle(e.request)
        return self._finish(out)

    # ------------------------------------------------------------------ failures

    def fail_inflight(self, flow: str, message: str) -> OutputBatch:
        """The engine of ``flow`` crashed: fail what its plans and its memory held."""
        out = self._collector()
        plans = self._inflight[flow]
        self._inflight[flow] = deque()
        self._finished_ids[flow] = []  # a restarted engine knows nothing
        victims: dict[str, Request] = {}
        for p in plans:
            p.release()
            victims.update((e.request.request_id, e.request) for e in p.entries if e.current)
        for r in self._running.values():
            if flow in r.known_by:
                victims[r.request_id] = r
        self._receives.drop(out, message)
        for r in victims.values():
            r.known_by.discard(flow)
            if r.live:
                self._fail(r, out, message)
        for p in plans:
            for e in p.entries:
                self._settle(e.request)
        return self._finish(out)

    def engine_lost_kv(self) -> None:
        """An engine crashed: its KV memory is gone, so cached prefixes must not be reused."""
        self._drop_cache = True

    def fail_all(self, message: str) -> OutputBatch:
        """Node shutdown (or a lost KV manager): every request ends with an error; pending
        KVSteps and in-flight plans are forgotten."""
        out = self._collector()
        for draft in self._drafts.values():
            draft.hold(-1)
            for r in draft.frees:
                self._freed(r)
        self._drafts.clear()
        for flow in self.flows:
            for p in self._inflight[flow]:
                p.release()
            self._inflight[flow] = deque()
            self._finished_ids[flow] = []
        self._receives.drop(out, message)
        for r in list(self._requests.values()):
            r.known_by.clear()
            if not r.state.terminal:
                self._fail(r, out, message)
            self._settle(r)
        return self._finish(out)

    # ------------------------------------------------------------------ internals

    def _collector(self) -> OutputCollector:
        return self._undelivered.deliver(OutputCollector())

    def _finish(self, out: OutputCollector) -> OutputBatch:
        """The batch, with what was decided on the way (e.g. receives ended unread)."""
        return self._undelivered.deliver(out).batch()

    def _computed(self) -> list[KVComputed]:
        """Prompt tokens covered by issued plans, for requests where that grew since last time.

        Capped at the prompt: the KV manager learns generated tokens only from KVFree.
        """
        out = []
        for r in self._running.values():
            n = min(r.num_scheduled, len(r.prompt))
            if n > r.num_reported:
                out.append(KVComputed(r.request_id, n))
                r.num_reported = n
        return out

    def _admit(self, flow: str, draft: Draft, result: KVStepResult) -> list[Request]:
        candidates = {r.request_id: r for r in draft.admits}
        newly = []
        for a in result.admitted:
            r = candidates.get(a.request_id)
            if r is None:
                continue
            r.has_blocks = True
            self._num_active += 1
            if r.state is not RequestState.WAITING:  # cancelled while the KVStep was out
                r.release_blocks(with_output=False)
                continue
            del self._waiting[r.request_id]
            self._admit_seq += 1
            r.admitted(a, self._admit_seq, flow)
            self._running[r.request_id] = r
            newly.append(r)
            self._counters["admitted"] += 1
            if flow == "generation":  # adaptive routing: a short prompt rides in decode steps
                self._counters["prompts_in_generation"] += 1
        never_fits = self._head.judge(draft.admits, result, self._num_active)
        if never_fits is not None:
            out = OutputCollector()
            self._fail(
                never_fits, out, f"{len(never_fits.prompt)} tokens do not fit in the KV cache"
            )
            self._undelivered.errors.extend(out.errors)
        return newly

    def _issue(
        self,
        flow: str,
        result: KVStepResult,
        entries: list[PlanEntry],
        receives: list[KVReceive] = (),
        cancels: list[str] = (),
    ) -> StepPlan:
        extended = result.extended
        new, steps = [], []
        for e in entries:
            r = e.request
            r.in_flight += 1
            blocks = extended.get(r.request_id, [])
            step, seq = sequence_step(r, flow, e.num_tokens, blocks, self.pipelined)
            steps.append(step)
            if seq is not None:
                new.append(seq)
            prefill = r.state is RequestState.PREFILL
            e.samples = r.schedule(e.num_tokens)
            if e.samples:
                self._samples.release(r, self._waiting)
            self._counters["prefill_tokens" if prefill else "decode_tokens"] += e.num_tokens
        count_plan(self.flows[flow], steps, self._counters)
        plan = StepPlan(
            iteration=result.iteration,
            new=new,
            steps=steps,
            finished=self._finished_ids[flow],
            copies=list(result.copies),
            flow=flow,
            receives=list(receives),
            cancel_receives=list(cancels),
        )
        self._finished_ids[flow] = []
        self._inflight[flow].append(IssuedPlan(flow, result.iteration, entries))
        return plan

    def _preempt_newest(self) -> None:
        """Extends failed: preempt the newest running request, unless blocks are on their way
        back from an earlier preemption (then the failed steps just retry next iteration)."""
        if self._preempting:
            return
        # a request waiting for its KV is never the victim: a read may be writing its blocks
        victim = next((r for r in reversed(self._running.values()) if not r.waiting_for_kv), None)
        if victim is None:
            return
        del self._running[victim.request_id]
        for f in victim.known_by:
            self._finished_ids[f].append(victim.request_id)
        victim.preempt()
        self._waiting[victim.request_id] = victim
        self._waiting.move_to_end(victim.request_id, last=False)
        self._preempting[victim.request_id] = victim
        self._counters["preemptions"] += 1
        self._settle(victim)

    def _handoff(self, r: Request, event_id: int) -> None:
        """Context result sampled the first token: the request moves to the generation flow."""
        r.flow = "generation"
        r.handoff_event_id = event_id
        if "context" in r.known_by:
            r.known_by.discard("context")
            self._finished_ids["context"].append(r.request_id)
        self._counters["handoffs"] += 1

    def _end(self, r: Request, state: RequestState, finish_reason: str | None) -> None:
        r.state = state
        r.finish_reason = finish_reason
        self._waiting.pop(r.request_id, None)
        self._running.pop(r.request_id, None)
        for f in r.known_by:
            self._finished_ids[f].append(r.request_id)
        r.known_by.clear()
        r.release_blocks(with_output=state is not RequestState.FAILED)
        self._receives.request_ended(r)
        self._counters[state.value] += 1
        self._samples.ended(r, self._waiting)
        self._settle(r)

    def _fail(self, r: Request, out: OutputCollector, message: str) -> None:
        self._end(r, RequestState.FAILED, None)
        out.error(r, "failed", message)

    def _freed(self, r: Request) -> None:
        """The KVStep carrying this request's free came back."""
        r.has_blocks = False
        r.free_state = FreeState.NONE
        r.kv_free = None
        self._num_active -= 1
        self._preempting.pop(r.request_id, None)
        self._settle(r)

    def _settle(self, r: Request) -> None:
        """Queue the free once nothing holds the request; forget it once it is fully gone."""
        if r.holds > 0 or r.kv_wait is KVWait.CANCEL:
            return
        if r.free_state is FreeState.PENDING:
            self._free_ready[r.request_id] = r
        elif r.state.terminal and not r.has_blocks and self._requests.get(r.request_id) is r:
            del self._requests[r.request_id]
