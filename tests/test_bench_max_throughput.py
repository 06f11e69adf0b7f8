"""bench_max_throughput: the serving roofline's arithmetic and a --quick smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greenroom.bench.roofline import (
    DeviceCeilings,
    kv_bytes_per_token,
    prefill_flops,
    serving_roofline,
    weight_bytes,
)
from greenroom.models.arch import ArchConfig
from greenroom.models.presets import preset_config

ROOT = Path(__file__).resolve().parent.parent


def test_weight_and_kv_bytes_of_llama_8b() -> None:
    arch = ArchConfig.from_dict(preset_config("random:llama-3.1-8b"))
    assert weight_bytes(arch, torch.bfloat16) == pytest.approx(16.06e9, rel=0.01)
    assert kv_bytes_per_token(arch, torch.bfloat16) == 32 * 2 * 8 * 128 * 2


def test_serving_roofline_counts_steps_kv_and_prefill() -> None:
    arch = ArchConfig.from_dict(preset_config("random:small"))
    ceilings = DeviceCeilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e12)
    w, kv = weight_bytes(arch, torch.float32), kv_bytes_per_token(arch, torch.float32)
    roof = serving_roofline([(10, 4), (20, 2)], 8, arch, torch.float32, ceilings)
    assert roof.decode_steps == 3  # the longest output less the prefill's token
    kv_tokens = (11 + 12 + 13) + 21  # each decoded token reads its context
    assert roof.decode_s == pytest.approx((3 * w + kv_tokens * kv) / 1e9)
    assert roof.prefill_s == pytest.approx(
        (prefill_flops(arch, 10) + prefill_flops(arch, 20)) / 1e12
    )
    assert roof.output_tokens == 6
    # the serial bound adds the decode rows' matmuls when they outweigh the weight reads
    matmul_s = (3 + 1) * prefill_flops(arch, 1) / 1e12
    assert roof.decode_serial_s == pytest.approx(kv_tokens * kv / 1e9 + max(3 * w / 1e9, matmul_s))
    slow_matmul = DeviceCeilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e6)
    compute_bound = serving_roofline([(10, 4), (20, 2)], 8, arch, torch.float32, slow_matmul)
    assert compute_bound.serial_seconds > compute_bound.seconds
    assert roof.serial_seconds >= roof.seconds
    # a batch limit below the concurrency makes more steps
    assert serving_roofline([(10, 3)] * 4, 2, arch, torch.float32, ceilings).decode_steps == 4


@pytest.mark.slow
def test_quick_run_prints_one_json_result() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_max_throughput.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["quick"] is True
    fixed, orca = result["fixed"], result["openorca"]
    # the pool (41 blocks of 16 tokens) holds 8 requests of 48 + 24 tokens
    assert fixed["requests"] == 8 and fixed["client"] == "process"
    assert fixed["measured"]["output_tokens"] == 8 * 24
    assert fixed["of_roofline"] == pytest.approx(
        fixed["measured"]["output_tokens_per_s"] / fixed["roofline"]["output_tokens_per_s"]
    )
    assert 0 < fixed["of_roofline"] < 1
    assert orca["requests"] >= 4 and orca["measured"]["num_requests"] == orca["requests"]
    assert fixed["engine_profile"]["decode"]["steps"] > 0
    assert result["targets"]["fixed_of_roofline"]["value"] == fixed["of_roofline"]
