"""`greenroom launch`: where this node sits in a deployment, from flags or the environment.

Precedence: the flags (``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``),
else torchrun's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
else Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST),
else one node on loopback. greenroom starts the ranks of a node itself, so either launcher
must run one task per node (``torchrun --nproc-per-node 1``, ``srun --ntasks-per-node 1``).

Ports from the master port P: the rendezvous store listens on P, the rank bus on P + 1. Under
torchrun, whose own agent holds MASTER_PORT, greenroom uses MASTER_PORT + 1 and + 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from greenroom.parallel.slurm import NodeListError, expand_nodelist

DEFAULT_MASTER_PORT = 29500


class LaunchError(ValueError):
    """A launch the node cannot start with; one line naming the flag or variable at fault."""


@dataclass(frozen=True)
class NodePlace:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # flags | torchrun | slurm | single node

    def overrides(self) -> dict[str, object]:
        return {
            "parallel.nnodes": self.nnodes,
            "parallel.node_rank": self.node_rank,
            "parallel.master_addr": self.master_addr,
            "parallel.master_port": self.master_port,
        }


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"environment variable {name} is missing")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_place(
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    env: Mapping[str, str],
) -> NodePlace:
    if any(v is not None for v in (nnodes, node_rank, master_addr, master_port)):
        n = nnodes or 1
        return NodePlace(
            nnodes=n,
            node_rank=node_rank or 0,
            master_addr=master_addr or "127.0.0.1",
            master_port=master_port if master_port is not None else _default_port(n),
            source="flags",
        )
    if "RANK" in env and "WORLD_SIZE" in env:
        local = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        if local != 1:
            raise LaunchError(
                f"torchrun started LOCAL_WORLD_SIZE={local} processes on this node; greenroom "
                "launch starts its ranks itself: run torchrun --nproc-per-node 1"
            )
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise LaunchError("torchrun environment without MASTER_ADDR and MASTER_PORT")
        return NodePlace(
            nnodes=_int(env, "WORLD_SIZE"),
            node_rank=_int(env, "RANK"),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT") + 1,
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        tasks, nodes = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_NNODES")
        if tasks != nodes:
            raise LaunchError(
                f"srun started SLURM_NTASKS={tasks} tasks on SLURM_NNODES={nodes} nodes; "
                "greenroom launch starts its ranks itself: run srun --ntasks-per-node 1"
            )
        try:
            hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", ""))
        except NodeListError as exc:
            raise LaunchError(f"SLURM_JOB_NODELIST: {exc}") from None
        if len(hosts) != nodes:
            raise LaunchError(
                f"SLURM_JOB_NODELIST names {len(hosts)} hosts but SLURM_NNODES={nodes}"
            )
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        return NodePlace(
            nnodes=nodes,
            node_rank=_int(env, "SLURM_NODEID"),
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=port,
            source="slurm",
        )
    return NodePlace(1, 0, "127.0.0.1", 0, "single node")


def _default_port(nnodes: int) -> int:
    return DEFAULT_MASTER_PORT if nnodes > 1 else 0


EXAMPLES = """\
examples:
  one machine, 2 GPUs:
    greenroom launch --model /models/Llama-3.1-70B-Instruct --tp-size 2
  two machines by hand, 8 GPUs each (16 ranks), node 0 at 10.0.0.1:
    greenroom launch --model M --tp-size 16 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
    greenroom launch --model M --tp-size 16 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500
  torchrun, one task per node (addresses and node rank from its environment):
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank $NODE --master-addr 10.0.0.1 \\
        --master-port 29500 -m greenroom.cli launch --model M --tp-size 16
  Slurm, one task per node (node list, node id and master from Slurm's environment):
    srun --nodes 2 --ntasks-per-node 1 greenroom launch --model M --tp-size 16

Ports: the rendezvous store listens on the master port P and the rank bus on P + 1 (under
torchrun, whose agent holds MASTER_PORT: MASTER_PORT + 1 and + 2). Node 0 hosts the frontend.
"""


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deployment (default: torchrun's, else Slurm's environment)")
    g.add_argument("--nnodes", type=int, default=None, metavar="N", help="nodes in the deployment")
    g.add_argument(
        "--node-rank",
        type=int,
        default=None,
        metavar="N",
        help="this node's index (0 hosts the head)",
    )
    g.add_argument(
        "--master-addr", default=None, metavar="HOST", help="node 0's address every node can reach"
    )
    g.add_argument(
        "--master-port",
        type=int,
        default=None,
        metavar="P",
        help=f"node 0's rendezvous port; the rank bus uses P + 1 (default: {DEFAULT_MASTER_PORT})",
    )


def place_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> NodePlace:
    return resolve_place(args.nnodes, args.node_rank, args.master_addr, args.master_port, env)


def launch_node(cfg, place: NodePlace) -> int:
    """Print where this node sits, then run the head (node 0) or a node agent."""
    import asyncio

    from greenroom.parallel.group_engine import layout_of

    p = cfg.parallel
    print(
        f"greenroom: launch ({place.source}): node {p.node_rank} of {p.nnodes}, "
        f"master {p.master_addr}:{p.master_port}",
        flush=True,
    )
    print(layout_of(cfg).describe(), flush=True)
    if p.node_rank == 0:
        from greenroom.node import serve

        return serve(cfg)
    from greenroom.logging import configure_logging
    from greenroom.parallel.agent import run_agent
    from greenroom.parallel.checks import check_local_gpus
    from greenroom.startup import StartupError

    try:
        check_local_gpus(cfg)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    configure_logging(cfg.log_format, cfg.log_level)
    return asyncio.run(run_agent(cfg))
