"""`greenroom demo`: the quick-start job.

Starts a node on the embedded tiny model in this process, replays the bundled slice of the
Azure conversation trace against it with the replay tool (through real sockets and the client
library), prints the metrics table and the paths of the files it wrote, and shuts the node
down.
"""

from __future__ import annotations

import argparse
import asyncio

from greenroom.config import NodeConfig
from greenroom.logging import configure_logging
from greenroom.replay.bundled import AZURE_CONV, bundled_trace


async def _demo(cfg: NodeConfig, args: argparse.Namespace) -> int:
    from greenroom.client import AsyncClient
    from greenroom.node import Node
    from greenroom.replay import cli as replay_cli

    node = await Node.start(cfg)
    print(
        f"greenroom: serving {node.info.model_name} on {node.info.device} at {node.address}",
        flush=True,
    )
    try:
        replay_args = replay_cli.build_parser().parse_args(
            [
                bundled_trace(AZURE_CONV),
                "--server",
                node.address,
                "--max-requests",
                str(args.requests),
                "--time-scale",
                str(args.time_scale),
                "--max-input-len",
                str(args.max_input_len),
                "--max-output-len",
                str(args.max_output_len),
                "--out",
                args.out,
            ]
        )
        async with AsyncClient(node.address, timeout=replay_args.timeout) as client:
            return await replay_cli.replay_with(client, replay_args)
    finally:
        await node.stop()


def run_demo(cfg: NodeConfig, args: argparse.Namespace) -> int:
    port_given = getattr(args, "port", None) is not None or any(
        o.strip().startswith("port=") for o in args.overrides or []
    )
    if not port_given:
        import msgspec

        cfg = msgspec.structs.replace(cfg, port=0)  # any free port: the demo talks to itself
    configure_logging(cfg.log_format, "warning" if cfg.log_level == "info" else cfg.log_level)
    return asyncio.run(_demo(cfg, args))
