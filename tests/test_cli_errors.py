"""Startup mistakes end in one line `greenroom: error: ...` (exit 2) naming the file or value;
help shows readable metavars and defaults; hub ids resolve from a local Hugging Face cache."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from greenroom import __version__, cli
from greenroom.config import ConfigError, load_config
from greenroom.models.arch import ArchConfig
from greenroom.models.max_len import decide_max_model_len
from greenroom.models.tiny import TINY_CONFIG, tiny_llama_dir
from greenroom.startup import StartupError, preflight, resolve_model_path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("greenroom: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def broken_checkpoint(tmp_path: Path) -> Path:
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM",}')
    return model


def test_each_startup_mistake_is_one_line_naming_the_value(
    capsys, tmp_path, busy_port, broken_checkpoint
) -> None:
    cases = [
        (["serve", "--max-num-tokens", "1e4"], ["--max-num-tokens", "'1e4'", "integer"]),
        (["serve", "--port", "http"], ["--port", "'http'"]),
        (["serve", "--set", "kv.tokens_per_blok=16"], ["did you mean 'tokens_per_block'"]),
        (["serve", "--config", str(tmp_path / "none.yaml")], ["none.yaml", "does not exist"]),
        (["serve", "--port", str(busy_port)], [f"port {busy_port}", "already in use"]),
        (["serve", "--host", "no-such-host.invalid"], ["--host 'no-such-host.invalid'"]),
        (["serve", "--host", "192.0.2.1"], ["--host '192.0.2.1'", "not an address"]),
        (["serve", "--model", str(tmp_path / "nowhere")], ["nowhere", "does not exist"]),
        (["serve", "--model", str(tmp_path)], [str(tmp_path), "no config.json"]),
        (["serve", "--model", str(broken_checkpoint)], ["broken/config.json", "not valid JSON"]),
        (["serve", "--max-model-len", "100000"], ["100000", "max_position_embeddings = 2048"]),
        (["serve", "--model", "random:nope"], ["nope", "random:llama-3.1-8b"]),
        (["demo", "--requests", "many"], ["--requests", "'many'"]),
        (["replay", "t.csv", "--time-scale", "fast"], ["--time-scale", "'fast'"]),
    ]
    for argv, needles in cases:
        if argv[0] == "serve":  # never the default port, which a running node may hold
            argv = ["serve", "--port", "0", *argv[1:]]
        code, _, err = run_main(capsys, *argv)
        line = one_line_error(err)
        assert code == cli.EXIT_USAGE, (argv, err)
        for needle in needles:
            assert needle in line, (argv, line)


def test_debug_adds_the_traceback(capsys, tmp_path) -> None:
    code, _, err = run_main(capsys, "--debug", "serve", "--model", str(tmp_path / "x"))
    assert code == cli.EXIT_USAGE and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("greenroom: error: ")
    code, _, err = run_main(capsys, "serve", "--debug", "--model", str(tmp_path / "x"))
    assert "Traceback" in err


def test_help_shows_readable_metavars_defaults_and_version(capsys) -> None:
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"greenroom {__version__}"
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for command in ("serve", "launch", "replay", "demo"):
        assert command in out
    code, out, _ = run_main(capsys, "serve", "--help")
    assert code == 0
    assert "__" not in out  # no internal dest names as metavars
    assert "--model DIR|HUB_ID" in out and "--max-num-tokens N" in out
    assert "--dtype {auto,float32,bfloat16,float16}" in out
    assert "default: 7700" in out.replace("\n", " ").replace("  ", " ")
    assert "default: 8192" in out


def test_max_model_len_beyond_positions_needs_the_override() -> None:
    arch = ArchConfig.from_dict(TINY_CONFIG)
    cfg = load_config(overrides={"model.max_model_len": 4096})
    with pytest.raises(ConfigError, match="max_position_embeddings = 2048"):
        decide_max_model_len(cfg.model, arch, "tiny")
    cfg = load_config(
        overrides={"model.max_model_len": 4096, "model.allow_long_max_model_len": True}
    )
    assert decide_max_model_len(cfg.model, arch, "tiny") == (4096, [])
    assert decide_max_model_len(load_config().model, arch, "tiny") == (2048, [])
    mistral = {**TINY_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 1024}
    windowed = ArchConfig.from_dict(mistral)
    assert windowed.window(0) == 1024  # attention slides; the length is not capped by it
    assert decide_max_model_len(load_config().model, windowed, "tiny") == (2048, [])


def _hub_cache(root: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding `repo_id` at one commit, laid out as the hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_llama_dir().iterdir():
        shutil.copy(f, snapshot / f.name)
    return snapshot


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _hub_cache(tmp_path / "hub", "acme/tiny-llama")
    assert Path(resolve_model_path("acme/tiny-llama")) == snapshot
    cfg = preflight(load_config(overrides={"model.path": "acme/tiny-llama", "port": 0}))
    assert Path(cfg.model.path) == snapshot
    assert json.loads((Path(cfg.model.path) / "config.json").read_text())["vocab_size"] == 512

    with pytest.raises(StartupError, match="--download") as err:
        resolve_model_path("acme/missing")
    assert str(tmp_path / "hub") in str(err.value)

    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is HF_HOME/hub
    assert Path(resolve_model_path("acme/tiny-llama")) == snapshot


def test_download_only_when_allowed(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    calls: list[dict] = []
    fetched = _hub_cache(tmp_path / "elsewhere", "acme/new")

    def fake_snapshot_download(repo_id: str, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(StartupError):
        resolve_model_path("acme/new", download=False)
    assert len(calls) == 1
    assert Path(resolve_model_path("acme/new", download=True)) == fetched
    assert calls[-1].get("local_files_only") is not True and "*.safetensors" in str(calls[-1])
