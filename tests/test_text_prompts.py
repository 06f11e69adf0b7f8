"""Text in, text out: a model directory with a tokenizer.json serves text prompts."""

from __future__ import annotations

import shutil

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, RequestRejected
from greenroom.config import load_config
from greenroom.models.tiny import tiny_llama_dir
from greenroom.node import Node

pytestmark = pytest.mark.slow


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word `w{i}`: encoding and decoding are easy to check by eye."""
    vocab = {f"w{i}": i for i in range(1, vocab_size)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return tok


async def test_text_prompt_is_tokenized_and_outputs_carry_text(tmp_path) -> None:
    model_dir = tmp_path / "tiny-with-tokenizer"
    shutil.copytree(tiny_llama_dir(), model_dir)
    word_tokenizer(512).save(str(model_dir / "tokenizer.json"))
    cfg = load_config(overrides={"port": 0, "kv.num_blocks": 64, "model.path": str(model_dir)})
    node = await Node.start(cfg)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            assert (await client.server_info()).has_tokenizer
            sampling = SamplingParams(max_tokens=6, ignore_eos=True)
            by_text = await client.generate(prompt="w1 w5 w9 w200", sampling=sampling)
            by_ids = await client.generate([1, 5, 9, 200], sampling)
            assert by_text.token_ids == by_ids.token_ids
            assert by_text.text.split() == [f"w{t}" for t in by_text.token_ids]
            with pytest.raises(RequestRejected, match="either"):
                await client.generate([1, 2], sampling, prompt="w1 w2")
    finally:
        await node.stop()


async def test_text_prompt_without_a_tokenizer_is_rejected() -> None:
    node = await Node.start(load_config(overrides={"port": 0, "kv.num_blocks": 64}))
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            with pytest.raises(RequestRejected, match="tokenizer"):
                await client.generate(prompt="hello", sampling=SamplingParams(max_tokens=2))
    finally:
        await node.stop()
