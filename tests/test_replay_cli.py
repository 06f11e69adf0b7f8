"""The replay CLI: flags and help, the table and the written paths on stdout (or one JSON line
with --quiet), the files in --out, exit statuses (--max-failures, Ctrl-C with a partial
report); run against the simulated server (`--server sim://`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from greenroom.replay import cli

SLICE = resources.files("greenroom").joinpath("data/azure_conv_slice.csv")
ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--server",
        "--format",
        "--time-scale",
        "--max-requests",
        "--duration",
        "--rate",
        "--slo",
        "--out",
        "--seed",
        "--max-concurrency",
        "--quiet",
        "--max-input-len",
        "--max-output-len",
        "--max-model-len",
        "--vocab-size",
        "--timeout",
        "--no-plots",
    ):
        assert flag in text
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"


def test_mounts_as_a_subcommand() -> None:
    top = argparse.ArgumentParser(prog="greenroom")
    sub = top.add_subparsers(dest="command")
    cli.add_arguments(sub.add_parser("replay"))
    args = top.parse_args(["replay", "t.csv", "--slo", "ttft=500,tpot=50", "--time-scale", "0.1"])
    assert args.trace == "t.csv" and args.time_scale == 0.1
    assert (args.slo.ttft_ms, args.slo.tpot_ms) == (500.0, 50.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["t.csv", "--slo", "ttft=fast"],
        ["t.csv", "--time-scale", "-1"],
        ["t.csv", "--max-requests", "0"],
        ["t.csv", "--format", "parquet"],
        ["t.csv", "--rate", "0"],
    ],
)
def test_bad_flags_are_refused(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_replay_against_the_simulated_server(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with resources.as_file(SLICE) as trace:
        code = cli.main(
            [
                str(trace),
                "--server",
                "sim://",
                "--max-requests",
                "40",
                "--time-scale",
                "0.02",
                "--max-output-len",
                "8",
                "--max-model-len",
                "1024",
                "--slo",
                "ttft=500,tpot=50",
                "--out",
                str(out),
            ]
        )
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON dump
    assert lines[-1].startswith("wrote ") and str(out / "report.json") in lines[-1]
    assert str(out / "latency_cdf.png") in lines[-1]
    report = json.loads((out / "report.json").read_text())
    assert report["num_sent"] == 40 == report["num_completed"] + report["num_failed"]
    assert report["run"]["format"] == "azure" and report["run"]["model"] == "simulated"
    assert report["run"]["max_model_len"] == 1024  # the flag overrides the server's value
    assert report["num_capped"] > 0 and report["num_clipped"] > 0
    assert report["goodput"]["ttft_ms"] == 500.0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(report[key]) >= {"mean", "p50", "p90", "p99"}
    table = "\n".join(lines[:-1])
    assert len(captured.out) < 4000
    assert "requests sent" in table and "TTFT" in table and "goodput" in table
    assert "40/40" in captured.err  # the progress bar goes to stderr
    assert json.loads((out / "report.json").read_text())["num_sent"] == 40
    records = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(r["max_tokens"] <= 8 for r in records)
    assert all(r["metrics"]["num_prompt_tokens"] == r["prompt_tokens"] for r in records)
    assert all(r["prompt_tokens"] + r["max_tokens"] <= 1024 for r in records)
    for name in ("latency_cdf.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quiet_prints_only_the_json_line(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "lengths.csv"
    trace.write_text("input_length,output_length\n" + "20,3\n" * 12)
    code = cli.main(
        [
            str(trace),
            "--server",
            "sim://",
            "--rate",
            "200",
            "--quiet",
            "--no-plots",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["num_completed"] == 12
    assert captured.err == ""
    assert not (tmp_path / "o" / "throughput.png").exists()


def test_bad_trace_exits_2(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("what,is,this\n1,2,3\n")
    assert cli.main([str(trace), "--server", "sim://", "--quiet"]) == 2
    assert "--format" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing.csv"), "--server", "sim://", "--quiet"]) == 2


def test_script_wrapper_runs(tmp_path: Path) -> None:
    trace = tmp_path / "lengths.csv"
    trace.write_text("input_length,output_length\n30,2\n40,2\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/replay_trace.py"),
            str(trace),
            "--server",
            "sim://",
            "--quiet",
            "--no-plots",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_completed"] == 2


def _overloading_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    trace = tmp_path / "lengths.csv"
    trace.write_text("input_length,output_length\n" + "20,30\n" * 20)
    argv = [str(trace), "--server", "sim://", "--time-scale", "0", "--quiet", "--no-plots"]
    return cli.build_parser().parse_args([*argv, "--out", str(tmp_path / "o"), *extra])


async def _replay_overloaded(args: argparse.Namespace) -> int:
    from greenroom.replay.simulated import SimulatedClient, SimulatedServerConfig

    async with SimulatedClient(SimulatedServerConfig(max_in_flight=5)) as client:
        return await cli.replay_with(client, args)


@pytest.mark.parametrize(
    ("limit", "status"), [(None, 1), ("14", 1), ("15", 0), ("70%", 1), ("75%", 0)]
)
async def test_max_failures_sets_the_exit_status(tmp_path: Path, capsys, limit, status) -> None:
    args = _overloading_args(tmp_path, *(["--max-failures", limit] if limit else []))
    assert await _replay_overloaded(args) == status
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["num_failed"] == 15 and report["failures"] == {"overloaded": 15}
    if status:
        assert "15 of 20 requests failed" in captured.err


def test_bad_max_failures_is_refused() -> None:
    for bad in ("-1", "x", "101%"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["t.csv", "--max-failures", bad])


def test_ctrl_c_writes_a_partial_report(tmp_path: Path) -> None:
    """SIGINT mid-replay: exit 130, report.json holds sent, completed, failed and unsent."""
    import signal
    import time

    trace = tmp_path / "lengths.csv"
    trace.write_text("input_length,output_length\n" + "20,400\n" * 200)
    out = tmp_path / "o"
    argv = [str(trace), "--server", "sim://", "--rate", "40", "--no-plots", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/replay_trace.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until requests are flowing (progress on stderr)
        line = proc.stderr.readline()
        if "req" in line or "/200" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    assert 0 < report["num_sent"] < 200 and report["num_unsent"] == 200 - report["num_sent"]
    assert report["num_sent"] == report["num_completed"] + report["num_failed"]
    assert report["failures"].get("interrupted", 0) >= 1  # in flight at the interrupt
    assert "not sent (interrupted)" in stdout
    assert "interrupted:" in stderr and "not sent" in stderr
