"""Every message on the bus: tagged msgspec Structs, decoded against one union.

Messages are diffs (DESIGN.md rule 3): a plan names a request's prompt once, then
only new block ids and token counts; a result carries only new tokens.
"""

from __future__ import annotations

import msgspec


class Message(msgspec.Struct, tag=True, array_like=True, gc=False, frozen=True, kw_only=True):
    """Base of every bus message; the tag is the class name."""


# --------------------------------------------------------------------------- sampling


class SamplingParams(
    msgspec.Struct,
    gc=False,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """How to sample; client-facing, so encoded as a map and strict about unknown fields."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = -1  # -1: disabled
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int = 0  # top-n log-probs of each sampled token (0: none)
    stop: list[str] = []  # stop strings (need a tokenizer); left out of the text
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens are out
    repetition_penalty: float = 1.0  # 1: off; seen tokens' logits divided (or multiplied)
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    n: int = 1  # parallel samples of one prompt, sharing its KV blocks

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def sample_request_id(request_id: str, index: int, n: int) -> str:
    """The id a sample of an ``n``-sample request has inside the node (the request's own
    when ``n == 1``). Clients cannot use the separator in their ids."""
    return request_id if n == 1 else f"{request_id}{SAMPLE_SEPARATOR}{index}"


SAMPLE_SEPARATOR = "\x1f"


# --------------------------------------------------------------------------- client <-> frontend


class ClientMessage(
    msgspec.Struct,
    tag=True,
    gc=False,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Client -> frontend messages: maps with named fields, so unknown fields are rejected."""


class GenerateRequest(ClientMessage):
    request_id: str
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None  # text; needs a tokenizer.json in the model directory
    sampling: SamplingParams = SamplingParams()
    priority: int = 35  # KV retention priority 0..100
    cache_salt: str | None = None


class AbortRequest(ClientMessage):
    request_id: str
    silent: bool = False  # the client left the stream: nothing more is sent for it


class PrefillRequest(GenerateRequest):
    """Router -> context node: prefill, sample the first token, then keep the blocks leased
    and reply with a TransferHandle (unless the first token already finished the request)."""


class DecodeRequest(GenerateRequest, kw_only=True):
    """Router -> generation node: receive the KV named by ``handle``, then decode the rest.
    The node answers one TransferDone when the receive settles, then the token deltas."""

    handle: TransferHandle


class ReleaseKV(ClientMessage):
    """Router -> context node: the receiver is done with a lease (``outcome`` is the
    receive's final state); the blocks go back to the pool."""

    request_id: str
    outcome: str = "complete"


class ServerInfoQuery(ClientMessage):
    request_id: str  # correlation id for the reply


class NodeStatsQuery(ClientMessage):
    request_id: str  # correlation id for the reply


class ServerInfo(Message):
    request_id: str
    model_name: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    tokens_per_block: int
    device: str
    has_tokenizer: bool = False
    role: str = "mixed"  # mixed | context | generation | router
    tp_size: int = 1
    kv_layout: str = ""  # what a KV block holds (layers, heads, dtype); equal to pair nodes
    max_message_bytes: int = 0  # the frontend disconnects a client sending a bigger message


class TransferHandle(Message):
    """Context node -> router -> generation node: where a prefilled request's KV is.

    The bytes move through NIXL (the receiver reads); only this handle travels on the bus.
    Blocks are block-major and contiguous: block b starts at ``pool_address + b * block_bytes``.
    """

    request_id: str
    agent_name: str
    agent_metadata: bytes
    pool_address: int
    block_bytes: int
    pool_blocks: int  # blocks in the context node's pool: every id is below this
    mem_type: str  # DRAM | VRAM
    device_id: int
    block_ids: list[int]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int
    tokens_per_block: int
    tp_size: int
    kv_layout: str
    lease_deadline: float  # wall-clock time the context node frees the blocks unacknowledged


class TransferDone(Message):
    """Generation node -> router: a receive settled (complete | error | cancelled | timed_out);
    the router acknowledges the context node with it."""

    request_id: str
    state: str
    message: str = ""


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False, frozen=True):
    token_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class RequestMetrics(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    """Final per-request metadata (KV reuse statistics in blocks)."""

    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    reused_blocks: int = 0
    onboarded_blocks: int = 0
    new_blocks: int = 0
    missed_blocks: int = 0
    preemptions: int = 0
    queue_time_s: float = 0.0  # arrival at the frontend to first admission


class NodeStats(Message):
    """Node-level figures for a client (an HTTP server's /metrics and /health)."""

    request_id: str
    running: int = 0  # admitted requests (prefill or decode)
    waiting: int = 0
    kv_total_blocks: int = 0
    kv_free_blocks: int = 0
    tokens_per_block: int = 0
    prefix_query_blocks: int = 0  # cumulative blocks looked up in the prefix cache
    prefix_hit_blocks: int = 0
    prompt_tokens: int = 0  # cumulative prompt tokens computed (prefill)
    generation_tokens: int = 0  # cumulative tokens sampled


class TokenDelta(Message):
    """New tokens of one request; the last one has finish_reason set."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    metrics: RequestMetrics | None = None  # on the final delta only
    text: str | None = None
    index: int = 0  # which sample of an n > 1 request


class RequestError(Message):
    """A request ended with an error. kind: invalid | overloaded | timeout | failed | aborted
    | malformed (a frame with no readable request id: request_id is empty)."""

    request_id: str
    kind: str
    message: str


# --------------------------------------------------------------------------- frontend <-> scheduler


class SubmitRequest(Message):
    """A validated request entering the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 35
    cache_salt: str | None = None
    arrival_time: float = 0.0
    lease_kv: bool = False  # context role: after the first token, lease the blocks
    kv_handle: TransferHandle | None = None  # generation role: receive this KV first


class CancelRequests(Message):
    request_ids: list[str]
    reason: str = "abort"


class OutputBatch(Message):
    """One iteration's deltas and errors for the frontend to stream."""

    deltas: list[TokenDelta] = []
    errors: list[RequestError] = []
    handles: list[TransferHandle] = []  # context role: leases made this iteration
    transfers: list[TransferDone] = []  # generation role: receives that settled


# --------------------------------------------------------------------------- scheduler <-> kv manager


class KVAdmit(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    request_id: str
    token_ids: list[int]
    reserve_tokens: int  # blocks to hold for this many tokens (prompt, or prompt + max_tokens)
    priority: int = 35
    cache_salt: str | None = None
    receive: TransferHandle | None = None  # generation role: blocks to fill from a context node


class KVAdmitted(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    request_id: str
    block_ids: list[int]
    num_cached_tokens: int
    reused_blocks: int = 0
    onboarded_blocks: int = 0
    new_blocks: int = 0
    missed_blocks: int = 0


class KVExtend(msgspec.Struct, array_like=True, gc=False, frozen=True):
    request_id: str
    num_tokens: int  # total tokens the request holds after the step being planned


class KVComputed(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Tokens of a request whose KV every earlier plan writes: full blocks become reusable."""

    request_id: str
    num_tokens: int


class KVFree(msgspec.Struct, array_like=True, gc=False, frozen=True):
    request_id: str
    output_token_ids: list[int] = []  # generated tokens, so their full blocks can be reused
    lease: bool = False  # context role: keep the blocks under a lease and make a handle


class KVReceive(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    """Read the KV of ``remote_blocks`` (a TransferHandle's pool) into ``local_blocks``."""

    request_id: str
    handle: TransferHandle
    remote_blocks: list[int]
    local_blocks: list[int]
    deadline: float  # wall clock: past it the read is abandoned (timed_out)


class TransferUpdate(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A receive's change of state: settled (complete | error | cancelled | timed_out: on the
    engine, or by its request ending first), or pending: a generation node accepted the
    request with ``handle``."""

    request_id: str
    state: str
    message: str = ""
    handle: TransferHandle | None = None  # pending only


class KVLeaseRelease(Message):
    """The receiver acknowledged a lease (or will never read it): free its blocks."""

    request_id: str
    outcome: str = "complete"


class KVAgentChanged(Message):
    """A restarted engine registered its KV pool with a new NIXL agent: later leases name it."""

    agent: KVAgentInfo


class KVLeaseSweep(Message):
    """Free the blocks of every lease past its deadline (the KV manager's own timer)."""


class KVStep(Message):
    """One batch-level KV message per iteration: applied as free, computed, extend, admit."""

    iteration: int
    free: list[KVFree] = []
    computed: list[KVComputed] = []
    extend: list[KVExtend] = []
    admit: list[KVAdmit] = []
    transfers: list[TransferUpdate] = []  # receives opened or settled, in the order they were
    # the engine restarted and lost its KV memory: after the frees, forget every cached block
    # no request holds (both tiers), so no admit reuses KV that no longer exists
    drop_cache: bool = False


class BlockCopy(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Copy one block between tiers: kind "offload" (GPU src -> host dst) or "onboard"
    (host src -> GPU dst). Engines run a plan's copies in order, before its forward."""

    kind: str
    src: int
    dst: int


class KVStepResult(Message):
    iteration: int
    copies: list[BlockCopy] = []  # host-tier traffic the next plan must run first
    admitted: list[KVAdmitted] = []
    rejected: list[str] = []  # not admitted (no room); the request stays waiting
    extended: dict[str, list[int]] = {}  # request id -> new block ids
    failed_extend: list[str] = []  # no room to grow: the scheduler preempts
    free_blocks: int = 0
    total_blocks: int = 0
    handles: list[TransferHandle] = []  # leases made by this step's frees
    receives: list[KVReceive] = []  # reads the next plan must start (admitted receivers)


class KVStats(Message):
    """Node-level KV counters."""

    total_blocks: int = 0
    free_blocks: int = 0
    host_blocks: int = 0
    free_host_blocks: int = 0
    lookups_blocks: int = 0
    hit_blocks: int = 0
    onboarded_blocks: int = 0
    offloaded_blocks: int = 0
    leased_blocks: int = 0  # context role: blocks held for receivers
    transfers: dict[str, int] = {}  # transfer sessions by final or current state
    # Helix (cp_size > 1): blocks in use by requests on each CP rank (idle cached ones free)
    rank_used_blocks: list[int] = []


class KVStatsQuery(Message):
    pass


class KVEvent(Message):
    """A block event a router could consume: stored | removed | offloaded | onboarded."""

    kind: str
    block_hashes: list[int]
    tier: str = "gpu"


# --------------------------------------------------------------------------- scheduler <-> engine


class NewSequence(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    """A request an engine has not seen: its prompt, once."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_cached_tokens: int  # prefix tokens whose KV is already in the pool
    block_ids: list[int]
    num_output_tokens: int = 0  # tokens at the end of prompt_token_ids that were sampled
    handoff_event_id: int = 0  # wait on this context-engine event before reading the KV


class SequenceStep(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """This step computes `num_tokens` more tokens of a request (a prefill chunk or one decode)."""

    request_id: str
    num_tokens: int
    new_block_ids: list[int] = []
    # pipeline parallelism: the step's input tokens that were sampled since the request's
    # last step; the stages that do not sample append them (the last stage has them)
    token_ids: list[int] = []


class StepPlan(Message):
    iteration: int
    new: list[NewSequence] = []
    steps: list[SequenceStep] = []  # includes the first chunk of each new sequence
    finished: list[str] = []  # forget these before running the step
    copies: list[BlockCopy] = []  # run in order before the forward
    flow: str = "mixed"  # mixed | context | generation
    receives: list[KVReceive] = []  # KV reads to start before the forward
    cancel_receives: list[str] = []  # abandon these reads (their requests ended)


class SampledToken(msgspec.Struct, array_like=True, gc=False, frozen=True):
    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None = None


class HandoffEvent(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Context -> generation handoff: the prefill finished on the context stream."""

    request_id: str
    event_id: int  # engine-local id of the CUDA event the generation stream waits on (0: none)


class StepResult(Message):
    iteration: int
    sampled: list[SampledToken] = []
    handoffs: list[HandoffEvent] = []
    flow: str = "mixed"
    error: str | None = None
    duration_s: float = 0.0
    transfers: list[TransferUpdate] = []  # reads that settled since the last result
    failed: dict[str, str] = {}  # request id -> why: these failed alone, the others ran


class KVAgentInfo(msgspec.Struct, array_like=True, gc=False, frozen=True, kw_only=True):
    """An engine's NIXL agent and its registered KV pool."""

    agent_name: str
    agent_metadata: bytes
    pool_address: int
    block_bytes: int
    pool_blocks: int
    mem_type: str
    device_id: int
    kv_layout: str

    def handle(
        self,
        request_id: str,
        block_ids: list[int],
        num_tokens: int,
        first_token: int,
        tokens_per_block: int,
        tp_size: int,
        lease_deadline: float,
    ) -> TransferHandle:
        """The handle a receiver needs to read ``block_ids`` of this agent's pool."""
        return TransferHandle(
            request_id=request_id,
            block_ids=block_ids,
            num_tokens=num_tokens,
            first_token=first_token,
            tokens_per_block=tokens_per_block,
            tp_size=tp_size,
            lease_deadline=lease_deadline,
            **msgspec.structs.asdict(self),
        )


class EngineInfo(Message):
    num_blocks: int
    tokens_per_block: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    device: str
    model_name: str
    kv_agent: KVAgentInfo | None = None  # context and generation roles


class EngineInfoQuery(Message):
    pass


ClientMessages = (
    GenerateRequest
    | PrefillRequest
    | DecodeRequest
    | ReleaseKV
    | AbortRequest
    | ServerInfoQuery
    | NodeStatsQuery
)
ClientReply = TokenDelta | RequestError | ServerInfo | NodeStats | TransferHandle | TransferDone
