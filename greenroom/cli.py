"""`greenroom` console script: serve, launch, keys, replay, demo.

Every mistake a user can make at start (a bad flag value, a config error, a taken port, a missing
model) ends with one line ``greenroom: error: ...`` on stderr and exit status 2; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, NoReturn

import greenroom
from greenroom.config import ConfigError, NodeConfig, config_default, load_config
from greenroom.startup import StartupError

EXIT_USAGE = 2  # bad flags, config errors and every other error found while starting
EXIT_FAILED = 1  # an unexpected failure after start

# flag -> dotted config key; the flags are shortcuts for `--set KEY=VALUE`. An optional fifth
# element names the metavar (default: from the type, or the Literal's choices).
_NODE_FLAGS: list[tuple[Any, ...]] = [
    (
        "--model",
        "model.path",
        str,
        "Hugging Face checkpoint directory or hub id (e.g. meta-llama/Llama-3.1-8B-Instruct, "
        "found in the local Hugging Face cache); random:NAME serves random weights of a named "
        "shape (default: the embedded tiny model)",
        "DIR|HUB_ID",
    ),
    ("--dtype", "model.dtype", str, "weight and activation dtype; auto: the checkpoint's"),
    ("--device", "model.device", str, "where the model runs; auto: CUDA when present"),
    (
        "--max-model-len",
        "model.max_model_len",
        int,
        "longest prompt + output in tokens (0: the checkpoint's max_position_embeddings)",
    ),
    (
        "--cpu-threads",
        "model.cpu_threads",
        int,
        "torch threads of a CPU engine (0: every core but one, left to the event loop)",
    ),
    ("--host", "host", str, "address the frontend binds (loopback by default)", "ADDR"),
    ("--port", "port", int, "frontend port (0: pick a free one)"),
    (
        "--engine-host",
        "engine_host",
        str,
        "run the engine on a thread, in a process, or auto (process on a GPU)",
    ),
    ("--max-num-tokens", "scheduler.max_num_tokens", int, "token budget per iteration"),
    ("--max-batch-size", "scheduler.max_batch_size", int, "requests per iteration"),
    (
        "--max-num-active-requests",
        "scheduler.max_num_active_requests",
        int,
        "admitted requests at once",
    ),
    ("--capacity-policy", "scheduler.capacity_policy", str, "what admission guarantees"),
    ("--tokens-per-block", "kv.tokens_per_block", int, "tokens per KV block (a power of two)"),
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
    (
        "--sm-policy",
        "sm_disagg.policy",
        str,
        "with --sm-disagg: adaptive (short prompts ride in decode steps) or fixed (every "
        "prompt on the context engine)",
    ),
    (
        "--routing-threshold",
        "sm_disagg.routing_threshold_tokens",
        int,
        "with --sm-disagg adaptive: prompts of at least this many tokens go to the context "
        "engine (0: measured at start, sm_disagg.ride_knee_multiple times the prefill knee)",
    ),
    ("--http-port", "http.port", int, "OpenAI-compatible HTTP API port (0: pick a free one)"),
    ("--http-host", "http.host", str, "address the HTTP API binds", "ADDR"),
    ("--http-workers", "http.workers", int, "HTTP server processes sharing the port"),
    ("--served-model-name", "http.served_model_name", str, "model name in the HTTP API"),
    (
        "--chat-template",
        "http.chat_template",
        str,
        "Jinja chat template file used instead of the checkpoint's",
        "FILE",
    ),
    (
        "--role",
        "role",
        str,
        "mixed: one whole node; context, generation, router: disaggregated serving",
    ),
    (
        "--kv-transfer-mode",
        "kv_transfer.mode",
        str,
        "generation role: sync (decode after the KV read settles) or async",
    ),
    ("--tp-size", "parallel.tp_size", int, "tensor-parallel ranks (one process per GPU)"),
    (
        "--pp-size",
        "parallel.pp_size",
        int,
        "pipeline stages, each holding a slice of the layers (x tp-size ranks in all)",
    ),
    (
        "--curve-secret-key",
        "security.curve_secret_key",
        str,
        "the server's NAME.key_secret (greenroom keys); needed beyond loopback",
        "FILE",
    ),
    (
        "--curve-authorized-keys",
        "security.curve_authorized_keys",
        str,
        "a client's NAME.key, or a directory of them: the clients allowed in",
        "PATH",
    ),
    (
        "--curve-peer-keys",
        "security.curve_peer_keys",
        str,
        "the other nodes' public keys: a NAME.key, or a directory of HOST_PORT.key / HOST.key "
        "(rank bus of a multi-node group; a router's context and generation nodes)",
        "PATH",
    ),
    (
        "--cp-size",
        "parallel.cp_size",
        int,
        "Helix context-parallel ranks: each holds every request's KV blocks i with "
        "i mod cp_size == its rank (role mixed, with --tp-size inside each CP rank; or role "
        "generation with tp_size 1)",
    ),
    ("--log-format", "log_format", str, "auto: JSON when stdout is not a terminal"),
    ("--log-level", "log_level", str, "lowest level logged"),
]

_TYPE_METAVARS = {int: "N", float: "X", str: "TEXT"}
_TYPE_WORDS = {int: "an integer", float: "a number", str: "text"}


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, not the usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=100)


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    print(f"greenroom: error: {message}", file=sys.stderr)
    sys.exit(status)


def _typed(typ: type, flag: str):
    """An argparse type whose error names the flag, the value and what was expected."""

    def convert(text: str):
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {_TYPE_WORDS.get(typ, typ.__name__)}, got {text!r}"
            ) from None

    convert.__name__ = typ.__name__
    return convert


def _choices_metavar(key: str) -> str | None:
    allowed = config_default(key, "choices")
    return "{" + ",".join(str(v) for v in allowed) + "}" if allowed else None


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML node configuration file (examples/node.yaml is a commented sample)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set scheduler.plans_in_flight=1 (repeatable)",
    )
    for flag, key, typ, help_, *rest in _NODE_FLAGS:
        metavar = rest[0] if rest else _choices_metavar(key) or _TYPE_METAVARS.get(typ, "VALUE")
        default = config_default(key)
        shown = "" if default is None else f"default: {default}; "
        p.add_argument(
            flag,
            dest=key.replace(".", "__"),
            type=_typed(typ, flag),
            default=None,
            metavar=metavar,
            help=f"{help_} ({shown}config: {key})",
        )
    p.add_argument(
        "--sm-disagg",
        action="store_true",
        help="SM-level prefill/decode disaggregation on one GPU (config: sm_disagg.enabled)",
    )
    p.add_argument(
        "--no-http",
        action="store_true",
        help="do not start the OpenAI-compatible HTTP API (config: http.enabled=false)",
    )
    p.add_argument(
        "--context-node",
        dest="context_nodes",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="router role: a context node's client address, e.g. tcp://10.0.0.2:7700; "
        "repeatable (config: router.context_nodes)",
    )
    p.add_argument(
        "--generation-node",
        dest="generation_nodes",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="router role: a generation node's client address; repeatable "
        "(config: router.generation_nodes)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="bind beyond loopback (client socket, rank bus) WITHOUT authentication [security.insecure]",
    )
    p.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="disable prefix reuse (config: kv.enable_prefix_reuse=false)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download a --model hub id missing from the local Hugging Face cache "
        "(config: model.download)",
    )
    p.add_argument(
        "--allow-long-max-model-len",
        action="store_true",
        help="accept --max-model-len beyond the checkpoint's positions (output quality past "
        "them is undefined; config: model.allow_long_max_model_len)",
    )


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )


def node_config_from_args(args: argparse.Namespace, extra: dict | None = None) -> NodeConfig:
    from greenroom.config import parse_override

    overrides: dict = dict(extra or {})
    for item in args.overrides:
        k, v = parse_override(item)
        overrides[k] = v
    for _, key, *_ in _NODE_FLAGS:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            overrides[key] = value
    if args.sm_disagg:
        overrides["sm_disagg.enabled"] = True
    if args.no_prefix_reuse:
        overrides["kv.enable_prefix_reuse"] = False
    if args.download:
        overrides["model.download"] = True
    if args.allow_long_max_model_len:
        overrides["model.allow_long_max_model_len"] = True
    if getattr(args, "no_http", False):
        overrides["http.enabled"] = False
    if args.context_nodes:
        overrides["router.context_nodes"] = list(args.context_nodes)
    if args.generation_nodes:
        overrides["router.generation_nodes"] = list(args.generation_nodes)
    if args.insecure:
        overrides["security.insecure"] = True
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="greenroom",
        formatter_class=_HelpFormatter,
        description="greenroom: an LLM inference serving runtime built as asyncio actors over "
        "ZeroMQ.",
        epilog="Run 'greenroom COMMAND --help' for the flags of a command.",
    )
    parser.add_argument("--version", action="version", version=f"greenroom {greenroom.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=description, formatter_class=_HelpFormatter
        )
        _add_debug(p)
        return p

    serve = command(
        "serve",
        "serve one node (frontend, scheduler, KV manager, engine)",
        "Serve one node until Ctrl-C or SIGTERM. With no --model it serves an embedded tiny "
        "random-weight Llama, so a fresh machine can run the whole pipeline.",
    )
    add_node_arguments(serve)

    from greenroom.parallel import launch as launch_cli

    launch = command(
        "launch",
        "serve one node of a deployment: multi-GPU, multi-node or a disaggregated role",
        "One command per node; --role picks mixed, context, generation or router. For a node "
        "spanning several GPUs or machines, node 0 runs the head (frontend, scheduler, KV "
        "manager) and its ranks, and every other node starts its ranks for the head; where this "
        "node sits comes from the flags, else torchrun's environment, else Slurm's, and the "
        "resolved layout is printed at start. The other flags are those of serve.",
    )
    launch.epilog = launch_cli.EXAMPLES
    launch.formatter_class = argparse.RawDescriptionHelpFormatter
    add_node_arguments(launch)
    launch_cli.add_launch_arguments(launch)

    keys = command(
        "keys",
        "make a CURVE key pair (for serving beyond loopback)",
        "Write NAME.key (public: give it to the other side) and NAME.key_secret "
        "(secret: keep it) into DIR. A server serves with --curve-secret-key "
        "DIR/server.key_secret --curve-authorized-keys CLIENT_KEYS; a client passes "
        "server_key=server.key and client_key=NAME.key_secret. Nodes talking to each other "
        "(a multi-machine launch, a router and its nodes) each take their own pair and "
        "--curve-peer-keys: the other nodes' NAME.key files (a directory of HOST_PORT.key or "
        "HOST.key).",
    )
    keys.add_argument("--dir", default="keys", help="where the key files go (default: keys)")
    keys.add_argument("--name", default="server", help="file name stem (default: server)")

    from greenroom.replay import cli as replay_cli

    replay = command(
        "replay",
        "replay a request trace against a running server and report latency/throughput",
        replay_cli.DESCRIPTION,
    )
    replay_cli.add_arguments(replay)

    demo = command(
        "demo",
        "start a node on the embedded tiny model and replay the bundled trace slice against it",
        "The quick-start job: serve the built-in tiny model in-process and drive it with the "
        "replay tool over the bundled Azure conversation trace slice; prints the metrics table.",
    )
    add_node_arguments(demo)
    demo.add_argument(
        "--requests",
        type=_typed(int, "--requests"),
        default=100,
        metavar="N",
        help="requests to replay from the slice (default: %(default)s)",
    )
    demo.add_argument(
        "--time-scale",
        type=_typed(float, "--time-scale"),
        default=0.5,
        metavar="X",
        help="arrival-time scale; smaller: faster arrivals (default: %(default)s)",
    )
    demo.add_argument(
        "--max-input-len",
        type=_typed(int, "--max-input-len"),
        default=256,
        metavar="N",
        help="clip prompts to N tokens, CPU-friendly (default: %(default)s)",
    )
    demo.add_argument(
        "--max-output-len",
        type=_typed(int, "--max-output-len"),
        default=32,
        metavar="N",
        help="clip outputs to N tokens, CPU-friendly (default: %(default)s)",
    )
    demo.add_argument(
        "--out",
        default="reports/demo",
        metavar="DIR",
        help="where the JSON report and plots go (default: %(default)s)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "launch":
        import os

        from greenroom.parallel.launch import LaunchError, launch_node, place_from_args

        try:
            place = place_from_args(args, os.environ)
        except LaunchError as exc:
            fail(str(exc))
        return launch_node(node_config_from_args(args, place.overrides()), place)
    if args.command == "serve":
        cfg = node_config_from_args(args)
        from greenroom.node import serve

        return serve(cfg)
    if args.command == "keys":
        from greenroom.bus.security import SecurityError, make_key_pair

        try:
            public, secret = make_key_pair(args.dir, args.name)
        except SecurityError as exc:
            fail(str(exc))
        print(f"public key: {public}\nsecret key: {secret} (keep it private)")
        return 0
    if args.command == "replay":
        from greenroom.replay import cli as replay_cli

        return replay_cli.run(args)
    if args.command == "demo":
        from greenroom.demo import run_demo

        return run_demo(node_config_from_args(args), args)
    fail(f"unknown command {args.command!r} (see 'greenroom --help')")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, StartupError) as exc:
        if args.debug:
            traceback.print_exc()
        fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        fail(f"{type(exc).__name__}: {exc}{hint}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
