"""Architectures beyond Llama through a real node: greedy tokens equal transformers.

Each tiny checkpoint is served by a node over loopback tcp with small KV blocks and a small
token budget, so prompts prefill over several chunks; the second request shares the first
one's prompt prefix (prefix reuse) and the last two run concurrently.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import pytest
from tiny_checkpoints import (
    TINY_DIMS,
    random_prompts,
    save_checkpoint,
    transformers_greedy,
    yarn_rope,
)

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TPB = 4
NEW_TOKENS = 16
SHARED = 24  # prompt tokens the second request shares with the first: 6 whole blocks

DIMS = TINY_DIMS

CHECKPOINTS = {
    # windows far shorter than prompt + output; prefill chunks (12) cross the window edge
    "mistral-window": lambda: transformers.MistralConfig(**DIMS, sliding_window=10),
    "qwen2-some-layers-slide": lambda: transformers.Qwen2Config(
        **DIMS,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen3-untied": lambda: transformers.Qwen3Config(**DIMS, head_dim=24, rope_theta=1e6),
    "qwen3-yarn-tied": lambda: transformers.Qwen3Config(
        **DIMS, head_dim=24, rope_theta=1e6, rope_scaling=yarn_rope(32), tie_word_embeddings=True
    ),
}


def prompts() -> list[list[int]]:
    first, own_suffix, other, last = random_prompts((30, 9, 17, 5), DIMS["vocab_size"], seed=11)
    return [first, first[:SHARED] + own_suffix, other, first + last]


async def serve(model_dir: Path, prompt_list: list[list[int]]):
    cfg = load_config(
        overrides={
            "port": 0,
            "model.path": str(model_dir),
            "kv.num_blocks": 128,
            "kv.tokens_per_block": TPB,
            "scheduler.max_num_tokens": 12,
            "log_level": "warning",
        }
    )
    node = await Node.start(cfg)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            results = [await client.generate(p, sampling) for p in prompt_list[:2]]
            results += await asyncio.gather(
                *(client.generate(p, sampling) for p in prompt_list[2:])
            )
    finally:
        await node.stop()
    return results


@pytest.mark.parametrize("name", list(CHECKPOINTS))
async def test_node_greedy_matches_transformers(name: str, tmp_path: Path) -> None:
    model_dir = save_checkpoint(
        CHECKPOINTS[name](), tmp_path / name, seed=zlib.crc32(name.encode())
    )
    prompt_list = prompts()
    results = await serve(model_dir, prompt_list)
    expected = transformers_greedy(model_dir, prompt_list, NEW_TOKENS)
    assert [r.token_ids for r in results] == expected
    assert results[1].metrics.reused_blocks == SHARED // TPB
    assert results[3].metrics.reused_blocks > 0
