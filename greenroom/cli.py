"""`greenroom` console script: serve, launch, replay, demo."""

from __future__ import annotations

import argparse
import sys

from greenroom.config import ConfigError, NodeConfig, load_config

# flag -> dotted config key; the flags are shortcuts for `--set KEY=VALUE`
_NODE_FLAGS: list[tuple[str, str, type, str]] = [
    (
        "--model",
        "model.path",
        str,
        "Hugging Face checkpoint directory (default: the embedded tiny model)",
    ),
    ("--dtype", "model.dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--device", "model.device", str, "auto | cpu | cuda"),
    (
        "--max-model-len",
        "model.max_model_len",
        int,
        "longest prompt + output (0: from the checkpoint)",
    ),
    ("--host", "host", str, "address the frontend binds (loopback by default)"),
    ("--port", "port", int, "frontend port (0: pick a free one)"),
    (
        "--engine-host",
        "engine_host",
        str,
        "run the engine on a 'thread', in a 'process', or 'auto' (process on a GPU)",
    ),
    ("--max-num-tokens", "scheduler.max_num_tokens", int, "token budget per iteration"),
    ("--max-batch-size", "scheduler.max_batch_size", int, "requests per iteration"),
    (
        "--max-num-active-requests",
        "scheduler.max_num_active_requests",
        int,
        "admitted requests at once",
    ),
    (
        "--capacity-policy",
        "scheduler.capacity_policy",
        str,
        "guaranteed_no_evict | max_utilization",
    ),
    ("--tokens-per-block", "kv.tokens_per_block", int, "tokens per KV block (power of two)"),
    ("--num-blocks", "kv.num_blocks", int, "KV blocks (0: size from free memory)"),
    (
        "--gpu-memory-utilization",
        "kv.gpu_memory_utilization",
        float,
        "fraction of GPU memory to use",
    ),
    ("--host-blocks", "kv.host_blocks", int, "host-memory tier size in blocks (0: off)"),
    (
        "--context-sm-percent",
        "sm_disagg.context_sm_percent",
        float,
        "SM share of the context engine (with --sm-disagg)",
    ),
    ("--log-format", "log_format", str, "auto | json | console"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
]


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML node configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set scheduler.plans_in_flight=1 (repeatable)",
    )
    for flag, key, typ, help_ in _NODE_FLAGS:
        p.add_argument(
            flag, dest=key.replace(".", "__"), type=typ, default=None, help=f"{help_} [{key}]"
        )
    p.add_argument(
        "--sm-disagg",
        action="store_true",
        help="SM-level prefill/decode disaggregation on one GPU [sm_disagg.enabled]",
    )
    p.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="disable prefix reuse [kv.enable_prefix_reuse=false]",
    )


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    overrides: dict = {}
    for item in args.overrides:
        from greenroom.config import parse_override

        k, v = parse_override(item)
        overrides[k] = v
    for _, key, _, _ in _NODE_FLAGS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides[key] = value
    if args.sm_disagg:
        overrides["sm_disagg.enabled"] = True
    if args.no_prefix_reuse:
        overrides["kv.enable_prefix_reuse"] = False
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greenroom",
        description="greenroom: an LLM inference serving runtime built as asyncio actors over ZeroMQ.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve one node (frontend, scheduler, KV manager, engine)",
        description="Serve one node. With no --model it serves an embedded tiny random-weight "
        "Llama on the CPU (or GPU), so a fresh machine can run the whole pipeline.",
    )
    add_node_arguments(serve)

    launch = sub.add_parser(
        "launch",
        help="serve one node of a deployment (role and addresses from flags)",
        description="One command per node. Today a node runs whole (role 'mixed'); flags are those of serve.",
    )
    add_node_arguments(launch)
    launch.add_argument(
        "--role", dest="role", choices=["mixed", "context", "generation"], default=None
    )

    from greenroom.replay import cli as replay_cli

    replay = sub.add_parser(
        "replay",
        help="replay a request trace against a running server and report latency/throughput",
        description=replay_cli.build_parser().description,
    )
    replay_cli.add_arguments(replay)

    demo = sub.add_parser(
        "demo",
        help="start a node on the embedded tiny model and replay the bundled trace slice against it",
        description="The quick-start job: serve the built-in tiny model in-process and drive it "
        "with the replay tool over the bundled Azure conversation trace slice; prints the metrics table.",
    )
    add_node_arguments(demo)
    demo.add_argument("--requests", type=int, default=200, help="requests to replay from the slice")
    demo.add_argument(
        "--time-scale",
        type=float,
        default=0.05,
        help="arrival-time scale (smaller: faster arrivals)",
    )
    demo.add_argument(
        "--max-input-len",
        type=int,
        default=256,
        help="clip prompts to this many tokens (CPU-friendly)",
    )
    demo.add_argument(
        "--max-output-len",
        type=int,
        default=32,
        help="clip outputs to this many tokens (CPU-friendly)",
    )
    demo.add_argument("--out", default="reports/demo", help="where the JSON report and plots go")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("serve", "launch"):
            cfg = node_config_from_args(args)
            if getattr(args, "role", None):
                import msgspec

                cfg = msgspec.structs.replace(cfg, role=args.role)
            from greenroom.node import serve

            return serve(cfg)
        if args.command == "replay":
            from greenroom.replay import cli as replay_cli

            return replay_cli.run(args)
        if args.command == "demo":
            from greenroom.demo import run_demo

            return run_demo(node_config_from_args(args), args)
    except ConfigError as exc:
        print(f"greenroom: configuration error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
