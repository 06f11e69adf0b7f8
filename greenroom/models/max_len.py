"""The node's max_model_len: what the user asked for, checked against the checkpoint."""

from __future__ import annotations

from greenroom.config import ConfigError, ModelConfig
from greenroom.models.arch import ArchConfig


def decide_max_model_len(
    model_cfg: ModelConfig, arch: ArchConfig, source: str
) -> tuple[int, list[str]]:
    """(max_model_len, one note per value lowered, with its reason).

    A request beyond the checkpoint's ``max_position_embeddings`` is refused unless
    ``model.allow_long_max_model_len`` is set: positions past the trained ones give output of
    undefined quality, and a user should not find that out from the answers."""
    positions = arch.max_position_embeddings
    asked = model_cfg.max_model_len
    if asked > positions and not model_cfg.allow_long_max_model_len:
        raise ConfigError(
            f"model.max_model_len = {asked} is invalid: {source} has "
            f"max_position_embeddings = {positions}; use at most {positions}, or set "
            "model.allow_long_max_model_len (--allow-long-max-model-len) to accept it"
        )
    # sliding-window layers attend over their window at any length: no cap from the window
    return asked or positions, []
