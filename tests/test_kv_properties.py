"""Property-based tests of the KV manager against a simulated engine.

The simulated engine keeps, for every GPU and host block, the token ids whose KV it holds; it
writes KV only where a request computes and runs every copy the manager emits, in order. After
each step the manager's invariants must hold, every cached block (either tier) must hold the
tokens the tree says, and every admitted prefix must hold the admitted prompt's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from greenroom.bus.messages import BlockCopy, KVAdmit, KVComputed, KVExtend, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7]]
prompts = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(PREFIXES + [[]]),
    st.lists(st.integers(0, 1), min_size=1, max_size=5),
)
admit_specs = st.lists(
    st.tuples(
        prompts, st.integers(0, 6), st.sampled_from([10, 35, 60]), st.sampled_from([None, "s"])
    ),
    min_size=1,
    max_size=3,
)


@dataclass
class Live:
    prompt_len: int
    tokens: list[int]
    blocks: list[int]
    written: int  # tokens whose KV the simulated engine wrote
    salt: str | None
    reported: int = 0  # tokens last reported computed
    outputs: list[int] = field(default_factory=list)


class KVMachine(RuleBasedStateMachine):
    @initialize(
        tpb=st.sampled_from([1, 2, 4]),
        room=st.integers(3, 10),  # pool size in 4-token units
        host_blocks=st.sampled_from([0, 2, 5]),
        reuse=st.booleans() | st.just(True),
        cp=st.sampled_from([1, 1, 2, 3]),  # Helix: block j of a request on rank j mod cp
    )
    def setup(self, tpb: int, room: int, host_blocks: int, reuse: bool, cp: int) -> None:
        num_blocks = cp * (-(-room * 4 // tpb // cp) + 1)
        host_blocks = host_blocks * 4 // tpb
        cfg = KVConfig(tokens_per_block=tpb, host_blocks=host_blocks, enable_prefix_reuse=reuse)
        self.tpb, self.cp = tpb, cp
        self.mgr = KVCacheManager(cfg, num_blocks, cp_size=cp)
        if cp > 1:
            event(f"cp_size {cp}")
        self.gpu: dict[int, list[int | None]] = {}
        self.host: dict[int, list[int | None]] = {}
        self.live: dict[str, Live] = {}
        self.next_id = 0
        self.next_token = 100  # sampled tokens: distinct, so outputs rarely collide
        self.history: list[tuple[list[int], str | None]] = []  # finished requests' tokens

    # ------------------------------------------------------------------ helpers

    def step(self, **parts):
        res = self.mgr.step(KVStep(iteration=self.next_id, **parts))
        self.run_copies(res.copies)
        for label, happened in (
            ("offload", any(c.kind == "offload" for c in res.copies)),
            ("onboard", any(c.kind == "onboard" for c in res.copies)),
            ("rejected admit", bool(res.rejected)),
            ("failed extend", bool(res.failed_extend)),
            ("reused prefix", any(a.reused_blocks for a in res.admitted)),
        ):
            if happened:
                event(label)
        return res

    def run_copies(self, copies: list[BlockCopy]) -> None:
        for c in copies:
            if c.kind == "offload":
                self.host[c.dst] = list(self.gpu.get(c.src, [None] * self.tpb))
            else:
                self.host.setdefault(c.src, [None] * self.tpb)
                self.gpu[c.dst] = list(self.host[c.src])

    def new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def write(self, rid: str, req: Live, upto: int) -> None:
        """The engine computes positions [written, upto): only into blocks no one else sees."""
        for pos in range(req.written, upto):
            block = req.blocks[pos // self.tpb]
            others = [r for r, o in self.live.items() if r != rid and block in o.blocks]
            assert not others, f"{rid} writes block {block} that {others} also hold"
            assert self.mgr.cache.node_of_block[block] is None, f"{rid} writes cached {block}"
            self.gpu.setdefault(block, [None] * self.tpb)[pos % self.tpb] = req.tokens[pos]
        req.written = upto

    def admit_batch(self, specs, frees: list[KVFree]) -> None:
        admits = []
        for prompt, extra, priority, salt in specs:
            admits.append(
                KVAdmit(
                    request_id=self.new_id(),
                    token_ids=prompt,
                    reserve_tokens=len(prompt) + extra,
                    priority=priority,
                    cache_salt=salt,
                )
            )
        res = self.step(free=frees, admit=admits)
        ids = [a.request_id for a in admits]
        got = [a.request_id for a in res.admitted]
        assert got + res.rejected == ids, "admission must be first come, first served"
        for admit, adm in zip(admits, res.admitted, strict=False):
            self.check_admitted(admit, adm)
        for rid in res.rejected:
            assert not self.mgr.holds(rid)

    def check_admitted(self, admit: KVAdmit, adm) -> None:
        tpb, tokens = self.tpb, admit.token_ids
        cached_blocks = adm.num_cached_tokens // tpb
        assert adm.num_cached_tokens % tpb == 0
        assert adm.num_cached_tokens <= len(tokens) - 1
        assert adm.reused_blocks + adm.onboarded_blocks == cached_blocks
        assert len(adm.block_ids) == max(-(-admit.reserve_tokens // tpb), cached_blocks)
        assert adm.new_blocks == len(adm.block_ids) - cached_blocks
        if self.mgr.prefix_reuse:
            assert adm.missed_blocks == max(0, (len(tokens) - 1) // tpb) - cached_blocks
        assert len(set(adm.block_ids)) == len(adm.block_ids) and 0 not in adm.block_ids
        for i in range(cached_blocks):
            stored = self.gpu.get(adm.block_ids[i])
            assert stored == tokens[i * tpb : (i + 1) * tpb], f"block {i} of a reused prefix"
        cached = adm.num_cached_tokens
        self.live[admit.request_id] = Live(
            len(tokens), list(tokens), list(adm.block_ids), cached, admit.cache_salt, cached
        )

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: len(self.live) < 4)
    @rule(specs=admit_specs, data=st.data())
    def admit(self, specs, data) -> None:
        if self.history and data.draw(st.booleans()):  # a follow-up turn of a finished request
            tokens, salt = data.draw(st.sampled_from(self.history))
            cut = data.draw(st.integers(1, len(tokens)))
            specs = [(tokens[:cut] + [0], 0, 35, salt), *specs[1:]]
        frees = []
        if self.live and data.draw(st.booleans()):
            rid = data.draw(st.sampled_from(sorted(self.live)))
            frees.append(self.finish_message(rid))
        self.admit_batch(specs, frees)

    def advance(self, rid: str, n: int) -> bool:
        """One prefill chunk of up to n tokens, or one decode step, extending as needed;
        False when the extend found no room."""
        req = self.live[rid]
        if req.written < req.prompt_len:
            upto = min(req.prompt_len, req.written + n)
        else:
            upto = req.written + 1
        if upto > len(req.blocks) * self.tpb:
            res = self.step(extend=[KVExtend(rid, upto)])
            if rid in res.failed_extend:
                assert self.mgr.blocks_of(rid) == req.blocks
                return False
            req.blocks += res.extended[rid]
            assert self.mgr.blocks_of(rid) == req.blocks
        self.write(rid, req, upto)
        if upto >= req.prompt_len:  # the step samples the next token
            req.tokens.append(self.next_token)
            req.outputs.append(self.next_token)
            self.next_token += 1
        return True

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 8))
    def forward(self, data, n: int) -> None:
        self.advance(data.draw(st.sampled_from(sorted(self.live))), n)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), decode=st.integers(0, 3))
    def run_to_end(self, data, decode: int) -> None:
        """Prefill the rest, report it, decode a few tokens, finish: blocks get cached."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        while req.written < req.prompt_len:
            if not self.advance(rid, 8):
                break
        self.step(computed=[KVComputed(rid, req.written)])
        req.reported = req.written
        for _ in range(decode):
            if not self.advance(rid, 1):
                break
        self.step(free=[self.finish_message(rid)])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def decode_burst(self, data) -> None:
        """Decode one request until its extend fails (or 12 steps): exhausts the pool."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        for _ in range(12):
            if not self.advance(rid, 8):
                break

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def report_computed(self, data) -> None:
        rids = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, unique=True))
        self.step(computed=[KVComputed(rid, self.live[rid].written) for rid in rids])
        for rid in rids:
            self.live[rid].reported = max(self.live[rid].reported, self.live[rid].written)

    def finish_message(self, rid: str) -> KVFree:
        req = self.live.pop(rid)
        self.history.append((req.tokens, req.salt))
        if req.written >= req.prompt_len:
            return KVFree(rid, req.outputs)
        return KVFree(rid)  # aborted mid-prefill: only reported blocks may be cached

    @precondition(lambda self: self.live)
    @rule(data=st.data(), readmit=st.booleans())
    def finish(self, data, readmit: bool) -> None:
        """Finish or abort a request; optionally readmit its tokens in the same step (what a
        preemption does), which must then find every block the free just cached."""
        rid = data.draw(st.sampled_from(sorted(self.live)))
        req = self.live[rid]
        free = self.finish_message(rid)
        if not readmit or not self.mgr.prefix_reuse or len(req.tokens) < 2:
            self.step(free=[free])
            return
        known = req.written if free.output_token_ids else req.reported
        expect = self.cached_after_free(rid, known)
        new = KVAdmit(
            request_id=self.new_id(),
            token_ids=req.tokens,
            reserve_tokens=len(req.tokens),
            cache_salt=req.salt,
        )
        res = self.step(free=[free], admit=[new])
        for adm in res.admitted:
            self.check_admitted(new, adm)
            assert adm.num_cached_tokens >= min(expect, len(req.tokens) - 1) // self.tpb * self.tpb

    def cached_after_free(self, rid: str, written: int) -> int:
        """Tokens certain to be cached once `rid` is freed (its chain in the tree, if any)."""
        chain = self.mgr.requests[rid]
        if chain.sealed:
            return len(chain.nodes) * self.tpb
        return max(len(chain.nodes) * self.tpb, written // self.tpb * self.tpb)

    @rule(n=st.integers(1, 4))
    def evict(self, n: int) -> None:
        self.mgr.evict(n)
        self.step()

    @rule()
    def drain(self) -> None:
        """Free everything: every block must come back."""
        frees = [self.finish_message(rid) for rid in sorted(self.live)]
        res = self.step(free=frees)
        assert res.free_blocks == res.total_blocks == self.mgr.total_blocks

    # ------------------------------------------------------------------ invariants

    @invariant()
    def manager_is_consistent(self) -> None:
        self.mgr.check_invariants()

    @invariant()
    def tables_match(self) -> None:
        for rid, req in self.live.items():
            assert self.mgr.blocks_of(rid) == req.blocks

    @invariant()
    def blocks_round_robin_over_ranks(self) -> None:
        """Block j of every request on CP rank j mod cp_size (so per-rank counts differ by at
        most one), and every rank's null block unused."""
        gpu = self.mgr.cache.gpu
        for rid, req in self.live.items():
            ranks = [gpu.rank_of(b) for b in req.blocks]
            assert ranks == [j % self.cp for j in range(len(req.blocks))], rid
            counts = [ranks.count(r) for r in range(self.cp)]
            assert max(counts) - min(counts) <= 1, rid
            assert not any(b % gpu.blocks_per_rank == 0 for b in req.blocks), rid

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        cache = self.mgr.cache
        for node in cache.tree.nodes():
            tier = self.gpu if node.on_gpu else self.host
            assert tier.get(node.block) == list(node.tokens), f"{node} holds other KV"


KVMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVMachine = KVMachine.TestCase
