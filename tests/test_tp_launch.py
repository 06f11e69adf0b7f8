"""Where a node sits: rank layout, launch flags / torchrun / Slurm environments, bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from greenroom.config import ConfigError, load_config
from greenroom.models.arch import ArchConfig
from greenroom.models.tiny import TINY_CONFIG
from greenroom.parallel.checks import check_parallel
from greenroom.parallel.launch import LaunchError, resolve_place
from greenroom.parallel.layout import LayoutError, RankCoords, RankLayout
from greenroom.parallel.slurm import NodeListError, expand_nodelist


def test_layout_maps_ranks_to_coordinates_tp_fastest() -> None:
    lay = RankLayout(pp_size=2, cp_size=2, tp_size=2, nnodes=2)
    assert lay.world_size == 8 and lay.ranks_per_node == 4
    assert lay.coords(5) == RankCoords(pp=1, cp=0, tp=1)
    assert all(lay.rank_of(**vars(lay.coords(r))) == r for r in range(8))
    assert lay.groups(("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups(("pp",)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.groups(("cp", "tp")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.group_of(6, ("cp",)) == [4, 6]
    assert list(lay.ranks_on_node(1)) == [4, 5, 6, 7] and lay.local_rank(6) == 2
    assert "node 1: 4(pp1 cp0 tp0)" in lay.describe()
    with pytest.raises(LayoutError, match="inconsistent world size"):
        RankLayout(tp_size=3, nnodes=2)


def test_flags_win_over_the_environment() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "1000"}
    place = resolve_place(2, 1, "127.0.0.1", 4000, env)
    assert (place.source, place.nnodes, place.node_rank, place.master_port) == ("flags", 2, 1, 4000)
    assert resolve_place(None, None, None, None, {}).source == "single node"


def test_torchrun_environment_one_task_per_node() -> None:
    env = {
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    place = resolve_place(None, None, None, None, env)
    assert place.source == "torchrun"
    # torchrun's agent holds MASTER_PORT: the store goes one above it
    assert (place.nnodes, place.node_rank, place.master_addr, place.master_port) == (
        2,
        1,
        "10.0.0.1",
        29501,
    )
    with pytest.raises(LaunchError, match="--nproc-per-node 1"):
        resolve_place(None, None, None, None, env | {"LOCAL_WORLD_SIZE": "4"})


def test_slurm_environment_with_a_compressed_node_list() -> None:
    env = {
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "3",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu-[07-08],gpu-11",
    }
    place = resolve_place(None, None, None, None, env)
    assert (place.source, place.nnodes, place.node_rank) == ("slurm", 3, 2)
    assert (place.master_addr, place.master_port) == ("gpu-07", 29500)
    with pytest.raises(LaunchError, match="--ntasks-per-node 1"):
        resolve_place(None, None, None, None, env | {"SLURM_NTASKS": "6"})
    with pytest.raises(LaunchError, match="names 2 hosts"):
        resolve_place(None, None, None, None, env | {"SLURM_JOB_NODELIST": "gpu-[07-08]"})


def test_node_list_expansion() -> None:
    assert expand_nodelist("gpu-[01-03,07],login1") == [
        "gpu-01",
        "gpu-02",
        "gpu-03",
        "gpu-07",
        "login1",
    ]
    assert expand_nodelist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    for bad in ("gpu-[3-1]", "gpu-[01", "", "gpu-[a]"):
        with pytest.raises(NodeListError):
            expand_nodelist(bad)


def test_inconsistent_layouts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="inconsistent world size"):
        load_config(overrides={"parallel.tp_size": 3, "parallel.nnodes": 2})
    with pytest.raises(ConfigError, match="node_rank"):
        load_config(
            overrides={"parallel.tp_size": 2, "parallel.nnodes": 2, "parallel.node_rank": 2}
        )
    with pytest.raises(ConfigError, match="cp_size"):
        load_config(overrides={"parallel.cp_size": 2, "parallel.pp_size": 2})
    with pytest.raises(ConfigError, match="master_port"):
        load_config(overrides={"parallel.tp_size": 2, "parallel.nnodes": 2})


def test_more_local_ranks_than_gpus_is_refused() -> None:
    arch = ArchConfig.from_dict(TINY_CONFIG)
    cfg = load_config(overrides={"parallel.tp_size": 4})
    with pytest.raises(ValueError, match="4 ranks per node .* 2 GPU"):
        check_parallel(cfg, arch, gpu_count=2)
    check_parallel(cfg, arch, gpu_count=4)
    check_parallel(cfg, arch, gpu_count=0)  # CPU ranks


def launch(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "greenroom.cli",
            "launch",
            "--port",
            "0",
            "--no-http",
            "--log-level",
            "warning",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc.returncode, proc.stderr.strip(), time.monotonic() - t0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tp-size", "3", "--nnodes", "2", "--master-port", "29999"), "inconsistent world size"),
        (("--tp-size", "3"), "tp_size = 3 does not divide num_attention_heads = 4"),
        (
            ("--tp-size", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "1"),
            "node_rank",
        ),
        (("--cp-size", "3"), "cp_size = 3 does not divide num_attention_heads = 4"),
        (("--cp-size", "2", "--nnodes", "3", "--master-port", "29999"), "inconsistent world size"),
        (("--cp-size", "2", "--pp-size", "2"), "Helix context parallelism runs with pp_size = 1"),
        (("--cp-size", "2", "--tp-size", "4"), "cp_size * tp_size = 8 does not divide"),
        (("--cp-size", "2", "--role", "context"), "role = 'context' with"),
    ],
)
def test_bad_launch_input_is_one_line_and_a_non_zero_exit(args, message) -> None:
    code, err, _ = launch(*args)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_unreachable_master_fails_within_the_connect_timeout() -> None:
    code, err, took = launch(
        "--tp-size", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
        "--master-port", "9", "--set", "parallel.connect_timeout_s=1",
    )  # fmt: skip
    assert code == 1 and "cannot reach the head" in err.splitlines()[-1], err
    assert took < 30
