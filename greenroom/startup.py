"""What a node checks before it loads a model: the address it will bind, where the checkpoint
is (a directory, or a Hugging Face hub id found in the local cache) and that the configured
lengths fit it. Each failure is a :class:`StartupError` whose one-line message names the file or
value, so a user learns of a taken port in a second, not after the model has loaded."""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

import msgspec

from greenroom.config import ConfigError, NodeConfig

# a hub id is "owner/name" (letters, digits, '-', '_', '.'), never a path that exists
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a serving node needs from a hub repository (no duplicate .bin/.pth weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


class StartupError(Exception):
    """A node cannot start; the message names the file or value at fault."""


def check_listen_address(host: str, port: int) -> None:
    """Fail now if the frontend could not bind ``host:port``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(
            f"--host {host!r} is not an address this machine can bind ({exc.strerror})"
        ) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # ZeroMQ sets SO_REUSEADDR on its listeners: a port in TIME_WAIT is not "in use"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use (choose another with --port, "
                    "or --port 0 for any free one)"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StartupError(
                    f"--host {host!r} is not an address of this machine ({exc.strerror})"
                ) from None
            if exc.errno == errno.EACCES:
                raise StartupError(
                    f"port {port} on {host} needs privileges this user lacks (use a port "
                    "above 1023)"
                ) from None
            raise StartupError(f"cannot bind {host}:{port}: {exc.strerror}") from None


def check_http_port(host: str, port: int) -> None:
    """Fail now if the HTTP API could not bind ``host:port``."""
    try:
        check_listen_address(host, port)
    except StartupError as exc:
        raise StartupError(
            f"HTTP API: {exc}".replace("--host", "--http-host").replace("--port", "--http-port")
            + ("; --no-http runs without it" if "in use" in str(exc) else "")
        ) from None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home) / "hub"


def resolve_hub_id(repo_id: str, download: bool) -> Path:
    """The local snapshot folder of a hub model: from the cache, else (when ``download``) from
    the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(
            snapshot_download(
                repo_id, cache_dir=cache, local_files_only=True, allow_patterns=HUB_PATTERNS
            )
        )
    except LocalEntryNotFoundError:
        if not download:
            raise StartupError(
                f"--model {repo_id!r} is not a directory and not in the local Hugging Face "
                f"cache ({cache}); add --download to fetch it from the Hub, or pass a "
                "checkpoint directory"
            ) from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, unknown repo: the hub's message says which
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"--model {repo_id!r}: download failed: {reason}") from None


def resolve_model_path(path: str | None, download: bool = False) -> str | None:
    """A checkpoint directory for ``model.path`` (unchanged for the embedded model and
    ``random:`` presets)."""
    from greenroom.models.presets import is_preset

    if not path or is_preset(path):
        return path
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise StartupError(
                f"model directory {path!r} has no config.json (expected a Hugging Face "
                "checkpoint directory)"
            )
        return str(local)
    if local.exists():
        raise StartupError(f"--model {path!r} is a file; expected a checkpoint directory")
    if _HUB_ID.match(path):
        return str(resolve_hub_id(path, download))
    raise StartupError(f"model directory {path!r} does not exist")


def preflight(cfg: NodeConfig) -> NodeConfig:
    """Check ``cfg`` before anything loads; returns it with ``model.path`` resolved to a
    local directory."""
    from greenroom.models.arch import ArchConfig, CheckpointError
    from greenroom.models.max_len import decide_max_model_len
    from greenroom.models.presets import is_preset, preset_config
    from greenroom.models.tiny import TINY_CONFIG
    from greenroom.parallel.checks import check_parallel

    check_listen_address(cfg.host, cfg.port)
    if cfg.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise StartupError("--device 'cuda': no CUDA device is available (use cpu or auto)")
    path = resolve_model_path(cfg.model.path, cfg.model.download)
    try:
        if not path:
            arch, source = ArchConfig.from_dict(TINY_CONFIG), "the embedded tiny model"
        elif is_preset(path):
            arch, source = ArchConfig.from_dict(preset_config(path), source=path), path
        else:
            arch, source = ArchConfig.from_dir(path), path
        decide_max_model_len(cfg.model, arch, source)
        check_parallel(cfg, arch)
    except (CheckpointError, ConfigError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    if path != cfg.model.path:
        cfg = msgspec.structs.replace(cfg, model=msgspec.structs.replace(cfg.model, path=path))
    return cfg
