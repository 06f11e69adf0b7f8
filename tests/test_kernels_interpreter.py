"""Run the Triton kernels in interpreter mode on CPU (fp32) against the torch references.

TRITON_INTERPRET is read when a kernel is defined, so the cases run in a fresh Python with the
variable set (this process may already have imported the kernels compiled for a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("kernels_interp_cases.py")
GROUPS = [
    "test_interpreter_mode_is_active",
    "test_decode_attention",
    "test_decode_attention_windowed",
    "test_decode_split_parts_merge_to_whole",
    "test_merge_attn_states",
    "test_prefill_attention",
    "test_prefill_attention_windowed",
    "test_prefill_attention_tiled",
    "test_write_kv_cache",
    "test_rms_norm",
    "test_rotary",
    "test_rotary_write_kv",
    "test_silu_and_mul",
]


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict[str, list[tuple[str, str | None]]]:
    report = tmp_path_factory.mktemp("interp") / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            str(CASES),
        ],
        env=env,
        cwd=CASES.parent.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if not report.exists():
        pytest.fail(
            f"interpreter run produced no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    results: dict[str, list[tuple[str, str | None]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if case.find("skipped") is not None:
            message = "skipped"
        else:
            message = (
                None if problem is None else (problem.get("message") or "") + (problem.text or "")
            )
        group = case.get("name", "").split("[")[0]
        results.setdefault(group, []).append((case.get("name", ""), message))
    return results


@pytest.mark.parametrize("group", GROUPS)
def test_kernel_in_interpreter(interpreter_results, group):
    cases = interpreter_results.get(group)
    assert cases, f"no interpreter cases ran for {group}"
    failed = [f"{name}: {message[-2000:]}" for name, message in cases if message is not None]
    assert not failed, "\n".join(failed)
