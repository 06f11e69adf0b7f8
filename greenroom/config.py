"""Node configuration: one frozen msgspec Struct per subsystem, validated at load.

A config comes from an optional YAML or TOML file plus dotted CLI overrides
(``scheduler.max_num_tokens=4096``). Every invalid value fails at load with a
:class:`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
import yaml

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
AtLeastOne = Annotated[float, msgspec.Meta(ge=1.0)]
OpenFraction = Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=100)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ConfigError(ValueError):
    """An invalid configuration value; the message names field, value and what is allowed."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Section):
    """Which weights to serve and how."""

    path: str | None = None  # HF checkpoint directory; None serves the embedded tiny model
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: NonNegInt = 0  # 0: take it from the checkpoint's config
    # a max_model_len beyond the checkpoint's max_position_embeddings is refused unless set
    allow_long_max_model_len: bool = False
    # a hub id missing from the local Hugging Face cache is downloaded only when set
    download: bool = False
    # torch intra-op threads of an engine on the CPU; 0: every core this process may use but
    # one, which the node's event loop keeps (greenroom/models/cpu_threads.py says why)
    cpu_threads: NonNegInt = 0
    seed: int = 0
    cuda_graphs: bool = True
    cuda_graph_max_batch_size: PositiveInt = 256
    # steps with prompt chunks beside decode rows of up to this many tokens replay captured
    # graphs (Python would launch a few hundred kernels per step); 0: such steps run eagerly
    cuda_graph_max_mixed_tokens: NonNegInt = 512
    # launch each plan behind the one still on the GPU and read that one's tokens after, so
    # the GPU goes from forward to forward (mixed mode and the SM-disaggregation generation
    # engine; the context engine, and nodes moving KV between them, run plain steps)
    overlap_steps: bool = True
    # decode-only steps of at least nano_batch_min_rows rows run as two nano-batches on two
    # streams, one half's attention beside the other half's matmuls (one rank serving the
    # whole model; off under tensor, pipeline and Helix parallelism and SM disaggregation)
    decode_nano_batches: bool = False
    nano_batch_min_rows: Annotated[int, msgspec.Meta(ge=2)] = 256
    # the nano-batches' attention kernels on a stream of their own, below the matmuls' streams
    # in priority (greenroom/models/nano_batches.py), instead of on each half's stream
    nano_batch_attention_stream: bool = False


class KVConfig(_Section):
    """The paged KV pool, the prefix tree and the host-memory tier."""

    tokens_per_block: PositiveInt = 16
    gpu_memory_utilization: Fraction = 0.9
    num_blocks: NonNegInt = 0  # 0: size from free device memory (CPU: cpu_pool_tokens)
    cpu_pool_tokens: PositiveInt = 65536  # pool size when running on CPU with num_blocks=0
    enable_prefix_reuse: bool = True
    host_blocks: NonNegInt = 0  # 0 disables the host tier
    offload_min_priority: Priority = 35
    default_priority: Priority = 35

    def __post_init__(self) -> None:
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise ValueError(
                f"tokens_per_block = {self.tokens_per_block} is invalid: must be a power of two"
            )


class SchedulerConfig(_Section):
    """Per-iteration budgets and admission policy."""

    max_num_tokens: PositiveInt = 8192
    max_batch_size: PositiveInt = 256
    max_num_active_requests: PositiveInt = 1024
    max_queue_size: PositiveInt = 4096  # admission queue; past it: "overloaded"
    capacity_policy: Literal["guaranteed_no_evict", "max_utilization"] = "max_utilization"
    plans_in_flight: Annotated[int, msgspec.Meta(ge=1, le=4)] = 2
    # micro-batches in flight under pipeline parallelism (parallel.pp_size > 1), each with
    # its own requests; 0: parallel.pp_size. More than pp_size hides the bus round trip.
    pp_depth: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


class ParallelConfig(_Section):
    """Ranks of a node (greenroom.parallel): sizes, the node's place, rendezvous, timeouts."""

    pp_size: PositiveInt = 1
    tp_size: PositiveInt = 1
    cp_size: PositiveInt = 1
    nnodes: PositiveInt = 1
    node_rank: NonNegInt = 0
    # node 0's address: the torch.distributed store listens on master_port, the rank bus
    # (plans, results, node agents) on master_port + 1; 0 picks free ports (one node only)
    master_addr: str = "127.0.0.1"
    master_port: Port = 0
    collective_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0  # ranks loading weights
    # a node agent gives up on a head it cannot reach (or stops hearing) after this long
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # layers of each pipeline stage, e.g. [12, 12, 8] (empty: an even split, the first
    # stages taking the remainder, so the last, which runs the LM head, has fewer)
    pp_layers: list[PositiveInt] = []
    # each stage reports when it ran each plan (benchmarks, tests; one message per stage)
    stage_reports: bool = False

    def __post_init__(self) -> None:
        if self.cp_size > 1 and self.pp_size > 1:
            raise ValueError(
                f"cp_size = {self.cp_size} with pp_size = {self.pp_size} is not supported yet: "
                "Helix context parallelism runs with pp_size = 1"
            )
        if self.pp_layers and len(self.pp_layers) != self.pp_size:
            raise ValueError(
                f"pp_layers = {self.pp_layers} is invalid: it gives {len(self.pp_layers)} "
                f"stages but pp_size = {self.pp_size}"
            )
        world = self.pp_size * self.cp_size * self.tp_size
        if world % self.nnodes:
            raise ValueError(
                f"nnodes = {self.nnodes} is invalid: inconsistent world size, "
                f"{world} ranks (pp_size * cp_size * tp_size) cannot be spread evenly over "
                f"{self.nnodes} nodes"
            )
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"node_rank = {self.node_rank} is invalid: must be below nnodes = {self.nnodes}"
            )
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError(
                "master_port = 0 is invalid with nnodes > 1: every node must be told the port"
            )

    @property
    def world_size(self) -> int:
        return self.pp_size * self.cp_size * self.tp_size


class SMDisaggConfig(_Section):
    """SM-level prefill/decode disaggregation on one GPU."""

    enabled: bool = False
    context_sm_percent: OpenFraction = 0.5
    context_max_num_tokens: int = 0  # <= 0: inherit scheduler.max_num_tokens
    context_max_batch_size: int = 0  # <= 0: inherit scheduler.max_batch_size
    # the context engine replays prefill CUDA graphs at padded token counts instead of
    # launching a few hundred kernels per step from Python (needs model.cuda_graphs)
    context_cuda_graphs: bool = True
    # adaptive: prompts of at least routing_threshold_tokens go to the context engine, shorter
    # (memory-bound) ones ride in the generation engine's step as in mixed mode; fixed: every
    # prompt goes to the context engine
    policy: Literal["adaptive", "fixed"] = "adaptive"
    # the routing threshold: prompts of at least this many tokens go to the context engine;
    # 0: measured when the node starts, ride_knee_multiple times the knee of a ladder of
    # prefill sizes (where step time starts growing linearly with tokens), timed on every SM
    # when the generation engine takes the whole GPU while idle, else on its partition
    routing_threshold_tokens: NonNegInt = 0
    # a measured threshold is this many knees: a chunk of a few knees makes a whole-GPU step a
    # few decode steps long, which still costs the decoders less than a context plan that
    # slows every decode step for its whole (longer) run on fewer SMs. On an H200 (8B shape,
    # OpenOrca at 32 req/s) 1 knee (128 tokens) lost 6% tokens/s per user to mixed mode with
    # 3x its TTFT p99, 4 and 8 knees matched it, 8 with the lower TTFT (BENCHMARKS.md)
    ride_knee_multiple: AtLeastOne = 8.0
    # adaptive: while the generation flow carries no request, a waiting prompt of any length
    # that fits its step rides there (it delays no decode and gets more SMs than the context
    # engine, or runs beside it instead of queueing behind it). On an H200 (8B shape) it cut
    # the prefill-heavy mix's TTFT p99 from 2.8x to 2.0x mixed mode's at no cost per user and
    # left the balanced and long-context mixes as they were (BENCHMARKS.md, run 6)
    ride_when_generation_idle: bool = True
    # the generation engine decodes on every SM while no context plan runs (a second set of
    # decode graphs on a whole-GPU stream), on its partition only while one does. "auto": on
    # under policy adaptive, off under fixed (on an H200, 8B shape, OpenOrca, fixed routing
    # lost 2-29% tokens/s per user with it: BENCHMARKS.md, SM-level disaggregation)
    generation_whole_gpu_when_idle: bool | Literal["auto"] = "auto"

    @property
    def whole_gpu_when_idle(self) -> bool:
        """``generation_whole_gpu_when_idle`` with "auto" decided by the policy."""
        if self.generation_whole_gpu_when_idle == "auto":
            return self.policy == "adaptive"
        return bool(self.generation_whole_gpu_when_idle)


class HttpConfig(_Section):
    """The OpenAI-compatible HTTP server: its own processes, speaking to the frontend."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8000  # 0: pick a free one
    workers: PositiveInt = 1  # server processes sharing the port
    served_model_name: str | None = None  # None: the node's model name
    chat_template: str | None = None  # a Jinja file overriding the checkpoint's template
    health_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0


class KVTransferConfig(_Section):
    """Disaggregated serving: KV moving from a context node to a generation node (NIXL)."""

    # sync: a request enters the decode flow only after its receive settled (the engine
    # waits for the read before the step's forward); async: it waits in waiting_for_kv
    # while the others decode, and the engine checks the read every iteration
    mode: Literal["sync", "async"] = "async"
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # a read not done by then fails
    # context role: leased blocks are freed this long after the handle unless acknowledged;
    # a generation node starts no read later than lease_margin_s before the lease ends
    lease_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    lease_margin_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # fault injection (tests, chaos runs): every KV read starts this much later
    read_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class RouterConfig(_Section):
    """Router role: the client-facing endpoint that pairs context and generation nodes."""

    context_nodes: list[str] = []  # client addresses of context nodes (tcp://host:port)
    generation_nodes: list[str] = []
    node_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # silent this long: node is dead


class FrontendConfig(_Section):
    """The client-facing socket's limits and liveness."""

    # a peer sending a bigger message is disconnected before it is buffered
    max_message_bytes: PositiveInt = 16 << 20
    max_request_id_len: PositiveInt = 256
    # ZMTP pings to clients this often; a client silent for 3 intervals is dropped. Off (0) by
    # default: libzmq 4.3 aborts the process when a ping times out towards a client whose
    # socket is full (a slow reader); TCP keepalive finds dead client hosts instead.
    heartbeat_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class SecurityConfig(_Section):
    """CURVE authentication of every socket bound beyond loopback: the client socket and the
    node-to-node ones (a group head's rank bus; a router's links to its nodes)."""

    # this node's NAME.key_secret from `greenroom keys`: it serves with it and presents it to
    # the peers it connects to
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None  # a client's NAME.key, or a directory of them
    # public keys of the other nodes: one NAME.key, or a directory with HOST_PORT.key or
    # HOST.key per node (the key a node connecting to HOST:PORT expects there); a head's rank
    # bus lets in every key of it
    curve_peer_keys: str | None = None
    insecure: bool = False  # allow a non-loopback bind without keys

    def __post_init__(self) -> None:
        if (self.curve_secret_key is None) != (self.curve_authorized_keys is None):
            raise ValueError(
                "curve_secret_key and curve_authorized_keys are invalid: give both or neither"
            )
        if self.curve_peer_keys is not None and self.curve_secret_key is None:
            raise ValueError(
                "curve_peer_keys is invalid without curve_secret_key: a node presents its own "
                "key pair to its peers (give --curve-secret-key and --curve-authorized-keys)"
            )


class NodeConfig(_Section):
    """Everything one node needs; sections are passed down to their subsystem unchanged."""

    role: Literal["mixed", "context", "generation", "router"] = "mixed"
    host: str = "127.0.0.1"
    port: Port = 7700  # frontend's client port (0: pick a free one)
    # auto: its own process on a GPU (no GIL shared with the routing loops: measured 0.97 of a
    # bare loop vs 0.93 on a thread), a thread on the CPU and with SM disaggregation
    engine_host: Literal["auto", "thread", "process"] = "auto"
    # engine (or rank group) crashes within a minute past which the node stops, exit status 1
    engine_max_restarts: NonNegInt = 3
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_stats_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0  # 0: no periodic summary
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    kv: KVConfig = msgspec.field(default_factory=KVConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    sm_disagg: SMDisaggConfig = msgspec.field(default_factory=SMDisaggConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    kv_transfer: KVTransferConfig = msgspec.field(default_factory=KVTransferConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    frontend: FrontendConfig = msgspec.field(default_factory=FrontendConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        p = self.parallel
        sizes = f"parallel.tp_size = {p.tp_size}, pp_size = {p.pp_size}"
        if p.world_size > 1 and self.sm_disagg.enabled:
            raise ValueError(
                f"sm_disagg.enabled with {sizes} is not supported: SM-level disaggregation "
                "runs on one GPU (pipeline and tensor parallelism need sm_disagg.enabled = false)"
            )
        helix_generation = self.role == "generation" and p.cp_size == p.world_size
        if p.world_size > 1 and self.role != "mixed" and not helix_generation:
            raise ValueError(
                f"role = {self.role!r} with {sizes}, cp_size = {p.cp_size} is not supported "
                "yet: a multi-rank node serves role 'mixed', or role 'generation' with "
                "cp_size > 1 alone (Helix)"
            )
        if self.kv_transfer.lease_margin_s >= self.kv_transfer.lease_s:
            raise ValueError(
                f"kv_transfer.lease_margin_s = {self.kv_transfer.lease_margin_s} is invalid: "
                f"must be below kv_transfer.lease_s ({self.kv_transfer.lease_s})"
            )
        if self.role == "router" and (
            not self.router.context_nodes or not self.router.generation_nodes
        ):
            raise ValueError(
                "role = 'router' is invalid without nodes: give router.context_nodes and "
                "router.generation_nodes (--context-node / --generation-node)"
            )
        if self.sm_disagg.enabled:
            if self.role != "mixed":
                raise ValueError(
                    f"sm_disagg.enabled with role = {self.role!r} is not supported: "
                    "SM-level disaggregation runs inside one mixed-role node"
                )
            if self.engine_host == "process":
                raise ValueError(
                    "sm_disagg.enabled with engine_host = 'process' is not supported: the two "
                    "engines share weights and the KV pool inside one process (engine_host = 'thread')"
                )
            if self.kv.host_blocks > 0:
                raise ValueError(
                    f"sm_disagg.enabled with kv.host_blocks = {self.kv.host_blocks} is not supported "
                    "yet: the host tier is not shared between the context and generation engines "
                    "(set kv.host_blocks = 0)"
                )

    def resolved_engine_host(self, cuda_available: bool) -> str:
        """Where the engine runs once `auto` is decided."""
        if self.engine_host != "auto":
            return self.engine_host
        on_gpu = cuda_available and self.model.device != "cpu"
        return "process" if on_gpu and not self.sm_disagg.enabled else "thread"

    @property
    def client_address(self) -> str:
        return f"tcp://{self.host}:{self.port}"


_SECTIONS = {
    "model",
    "kv",
    "scheduler",
    "parallel",
    "sm_disagg",
    "http",
    "kv_transfer",
    "router",
    "frontend",
    "security",
}


def _lookup(data: dict[str, Any], path: list[str]) -> Any:
    cur: Any = data
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return "<missing>"
        cur = cur[key]
    return cur


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for key in keys[:-1]:
        nxt = cur.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {key!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"scheduler.max_num_tokens=4096"`` -> ``("scheduler.max_num_tokens", 4096)``."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is invalid: expected KEY=VALUE, e.g. kv.host_blocks=1024"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() else None
    return key, value


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path.name!r}: suffix must be .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path.name!r} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path.name!r} must hold a mapping at the top level")
    return data


def _allowed(path: list[str]) -> str:
    """For a Literal field, the allowed values as text ("" otherwise)."""
    cls: Any = NodeConfig
    hint: Any = None
    for key in path:
        hints = get_type_hints(cls, include_extras=True) if isinstance(cls, type) else {}
        if key not in hints:
            return ""
        hint = hints[key]
        cls = hint
    if get_origin(hint) is Literal:
        return "; allowed: " + " | ".join(repr(v) for v in get_args(hint))
    return ""


def _fields(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}? " if match else ""


def _check_names(data: dict[str, Any], cls: type = None, prefix: str = "") -> None:
    """Unknown sections and fields fail naming the valid ones, the closest first."""
    cls = cls or NodeConfig
    hints = _fields(cls)
    for key, value in data.items():
        if key not in hints:
            where = (
                f"a field of section {prefix[:-1]!r}"
                if prefix
                else "a configuration section or field"
            )
            sections = [
                k for k, h in hints.items() if isinstance(h, type) and issubclass(h, _Section)
            ]
            fields = [k for k in hints if k not in sections]
            valid = f"fields: {', '.join(fields)}" + (
                f"; sections: {', '.join(sections)}" if sections else ""
            )
            raise ConfigError(
                f"{prefix}{key} is not {where}; {_closest(str(key), list(hints))}valid {valid}"
            )
        hint = hints[key]
        if isinstance(hint, type) and issubclass(hint, _Section) and isinstance(value, dict):
            _check_names(value, hint, f"{prefix}{key}.")


def config_default(dotted: str, what: Literal["default", "choices"] = "default") -> Any:
    """The default value (or a Literal field's allowed values) of a dotted config key."""
    cls: Any = NodeConfig
    keys = dotted.split(".")
    for key in keys[:-1]:
        cls = _fields(cls)[key]
    if what == "choices":
        hint = _fields(cls)[keys[-1]]
        return list(get_args(hint)) if get_origin(hint) is Literal else None
    return getattr(cls(), keys[-1])


def build_config(data: dict[str, Any]) -> NodeConfig:
    """Validate a plain mapping into a NodeConfig, with errors naming field and value."""
    _check_names(data)
    try:
        return msgspec.convert(data, NodeConfig, strict=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if " - at `$." in msg:
            reason, where = msg.rsplit(" - at `$.", 1)
            field = where.rstrip("`")
            path = [p for p in field.replace("[", ".").replace("]", "").split(".") if p]
            if " is invalid: " in reason:  # a cross-field check already names field and value
                raise ConfigError(f"{field}.{reason}") from None
            value = _lookup(data, path)
            raise ConfigError(f"{field} = {value!r} is invalid: {reason}{_allowed(path)}") from None
        raise ConfigError(f"invalid configuration: {msg}") from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> NodeConfig:
    """Load a NodeConfig from an optional YAML/TOML file plus dotted overrides."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        _set_dotted(data, key, value)
    return build_config(data)


def sm_disagg_budgets(cfg: NodeConfig) -> tuple[int, int]:
    """Context-flow (max_num_tokens, max_batch_size), inheriting when <= 0."""
    sd, sc = cfg.sm_disagg, cfg.scheduler
    tokens = sd.context_max_num_tokens if sd.context_max_num_tokens > 0 else sc.max_num_tokens
    batch = sd.context_max_batch_size if sd.context_max_batch_size > 0 else sc.max_batch_size
    return tokens, batch


__all__ = [
    "ConfigError",
    "FrontendConfig",
    "HttpConfig",
    "KVConfig",
    "KVTransferConfig",
    "ModelConfig",
    "NodeConfig",
    "ParallelConfig",
    "RouterConfig",
    "SMDisaggConfig",
    "SchedulerConfig",
    "SecurityConfig",
    "build_config",
    "config_default",
    "load_config",
    "parse_override",
    "read_config_file",
    "sm_disagg_budgets",
]
