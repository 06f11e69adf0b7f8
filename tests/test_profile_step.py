"""scripts/profile_step.py --quick: a mixed and a decode-only shape on CPU, the decode one also
split into nano-batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"


def test_profile_step_quick_times_each_shape() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--reps",
            "1",
            "--nano-batches",
            "--shapes",
            "2x24+3@40,0x0+4@40",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    mixed, decode = out["shapes"]
    assert (mixed["rows"], mixed["tokens"]) == (5, 51)
    assert mixed["eager_ms"] > 0 and mixed["decode_rows_in_prefill_kernel_ms"] > 0
    assert (
        decode["rows"] == decode["tokens"] == 4 and "decode_rows_in_prefill_kernel_ms" not in decode
    )
    assert mixed["prefill_matmul_floor_ms"] > 0 and decode["prefill_matmul_floor_ms"] == 0
    assert "nano_eager_ms" not in mixed  # only decode-only steps split
    assert decode["nano_eager_ms"] > 0 and decode["nano_over_plain_eager"] > 0
    assert decode["nano_logits_max_abs_diff"] < 1e-4
    assert decode["nano_attn_stream_eager_ms"] > 0
    assert decode["nano_attn_stream_logits_max_abs_diff"] < 1e-4


def test_profile_step_rejects_a_malformed_shape() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--shapes", "8x1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "PROMPTS x PROMPT_LEN" in run.stderr
