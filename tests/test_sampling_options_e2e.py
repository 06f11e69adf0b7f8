"""Sampling options through a node and the client: stop strings with a real (locally trained)
tokenizer, min_tokens, penalties, logit_bias, n > 1 on shared prompt blocks, validation."""

from __future__ import annotations

import random
import shutil

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, RequestRejected
from greenroom.config import load_config
from greenroom.models.tiny import tiny_llama_dir
from greenroom.node import Node

pytestmark = pytest.mark.slow

PROMPT = list(range(20, 60))  # 40 tokens: two full blocks of 16


def bpe_tokenizer(vocab_size: int) -> Tokenizer:
    """A BPE tokenizer trained here on seeded random words: tokens of one to several letters,
    word starts marked by a space (Metaspace), so text breaks inside words and tokens."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(400)]
    corpus = [" ".join(rng.choices(words, k=12)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == vocab_size
    return tok


async def start(tmp_path=None, **overrides) -> Node:
    base = {"port": 0, "kv.num_blocks": 128, "log_level": "warning"}
    if tmp_path is not None:
        model_dir = tmp_path / "tiny-bpe"
        shutil.copytree(tiny_llama_dir(), model_dir)
        bpe_tokenizer(512).save(str(model_dir / "tokenizer.json"))
        base["model.path"] = str(model_dir)
    return await Node.start(load_config(overrides=base | overrides))


async def test_stop_strings_across_token_boundaries(tmp_path) -> None:
    node = await start(tmp_path)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            plain = SamplingParams(max_tokens=24, ignore_eos=True)
            full = await client.generate(PROMPT, plain)
            tok = Tokenizer.from_file(str(tmp_path / "tiny-bpe" / "tokenizer.json"))
            pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
            # a stop string from the end of token 5's text into token 6's
            end5 = len(pieces[5])
            stop = full.text[end5 - 2 : end5 + 2]
            assert len(stop) == 4 and stop not in full.text[: end5 - 2 + 3]
            cut = full.text.find(stop)
            sampling = SamplingParams(max_tokens=24, ignore_eos=True, stop=["zzzzzz", stop])
            deltas = [d async for d in client.stream(PROMPT, sampling)]
            text = "".join(d.text or "" for d in deltas)
            tokens = [t for d in deltas for t in d.token_ids]
            last = deltas[-1]
            assert text == full.text[:cut]  # the stop string and what follows are left out
            assert last.finish_reason == "stop"
            # tokens up to the one that completed the stop string, and the metrics agree
            done = next(i for i, p in enumerate(pieces) if stop in p)
            assert tokens == full.token_ids[: done + 1]
            assert last.metrics.num_output_tokens == len(tokens)
            # a stop string the text never contains changes nothing
            never = await client.generate(
                PROMPT, SamplingParams(max_tokens=24, ignore_eos=True, stop=["qqqqqqq"])
            )
            assert never.text == full.text and never.finish_reason == "length"
            # matching starts after min_tokens: a stop inside the first tokens is not seen
            early = full.text[:3]
            late = await client.generate(
                PROMPT, SamplingParams(max_tokens=24, ignore_eos=True, stop=[early], min_tokens=8)
            )
            assert late.text.startswith(early) and len(late.token_ids) >= 8
            # each of n samples stops on its own text
            many = await client.generate(
                PROMPT, SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop], n=2)
            )
            assert [r.text for r in many] == [full.text[:cut]] * 2
            assert [r.finish_reason for r in many] == ["stop", "stop"]
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_n_samples_share_the_prompt_blocks_and_are_seeded() -> None:
    node = await start()
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            hot = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
            before = await node.kv_stats()
            results = await client.generate(PROMPT, hot, cache_salt="n3")
            after = await node.kv_stats()
            assert [r.index for r in results] == [0, 1, 2]
            assert all(r.finish_reason == "length" and len(r.token_ids) == 8 for r in results)
            # the first sample computes the prompt; the others are admitted onto its two blocks
            assert results[0].metrics.reused_blocks == 0
            assert [r.metrics.reused_blocks for r in results[1:]] == [2, 2]
            assert after.hit_blocks - before.hit_blocks >= 4
            # sample i is the request with seed + i: a pure function of the seed
            for i, r in enumerate(results):
                one = SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i, ignore_eos=True)
                assert (await client.generate(PROMPT, one)).token_ids == r.token_ids
            assert len({tuple(r.token_ids) for r in results}) == 3
            # streaming: deltas name their sample; the stream ends after every sample finished
            seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
            finished = []
            async for d in client.stream(PROMPT, hot):
                seen[d.index].extend(d.token_ids)
                if d.finish_reason:
                    finished.append(d.index)
            assert sorted(finished) == [0, 1, 2]
            assert [seen[i] for i in range(3)] == [r.token_ids for r in results]
            # aborting an n > 1 request ends every sample
            long = SamplingParams(max_tokens=200, temperature=1.0, n=4, ignore_eos=True)
            async for _ in client.stream(PROMPT, long):
                break
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_min_tokens_penalties_and_logit_bias_through_the_node() -> None:
    node = await start()
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            greedy = (
                await client.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
            ).token_ids
            first = greedy[0]
            # the first greedy token as a stop id ends the request at once...
            stopped = await client.generate(
                PROMPT, SamplingParams(max_tokens=8, stop_token_ids=[first])
            )
            assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
            # ...unless min_tokens masks it for the first 3 tokens
            held = await client.generate(
                PROMPT, SamplingParams(max_tokens=8, stop_token_ids=[first], min_tokens=3)
            )
            assert len(held.token_ids) >= 3
            assert first not in held.token_ids[:3]
            # logit bias: a ban moves the first token, a large bonus forces one
            banned = await client.generate(
                PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={first: -100.0})
            )
            assert banned.token_ids[0] != first
            forced = await client.generate(
                PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={42: 100.0})
            )
            assert forced.token_ids == [42] * 4
            # penalties change the tokens (negative ones reward repeats), deterministically,
            # and a request without options in between is still plain greedy
            pen = SamplingParams(
                max_tokens=8, ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-2.0
            )
            a = await client.generate(PROMPT, pen)
            plain = SamplingParams(max_tokens=8, ignore_eos=True)
            assert (await client.generate(PROMPT, plain)).token_ids == greedy
            assert a.token_ids != greedy and len(set(a.token_ids)) < len(set(greedy))
            assert (await client.generate(PROMPT, pen)).token_ids == a.token_ids
        await node.wait_blocks_free()
    finally:
        await node.stop()


BAD = [
    (SamplingParams(n=0), "n = 0"),
    (SamplingParams(n=17), "n = 17"),
    (SamplingParams(min_tokens=-1), "min_tokens"),
    (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(repetition_penalty=float("nan")), "repetition_penalty"),
    (SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
    (SamplingParams(presence_penalty=2.5), "presence_penalty"),
    (SamplingParams(frequency_penalty=float("-inf")), "frequency_penalty"),
    (SamplingParams(logit_bias={512: 1.0}), "vocabulary"),
    (SamplingParams(logit_bias={-1: 1.0}), "vocabulary"),
    (SamplingParams(logit_bias={3: float("nan")}), "logit_bias"),
    (SamplingParams(logit_bias={3: 101.0}), "logit_bias"),
    (SamplingParams(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias"),
    (SamplingParams(stop=["x"] * 17), "stop"),
    (SamplingParams(stop=[""]), "stop"),
    (SamplingParams(stop=["y" * 257]), "stop"),
    (SamplingParams(stop=["end"]), "tokenizer"),  # this node has none
]


async def test_invalid_options_are_rejected_with_the_field_named() -> None:
    node = await start()
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            for sampling, match in BAD:
                with pytest.raises(RequestRejected, match=match):
                    await client.generate([1, 2, 3], sampling)
            with pytest.raises(RequestRejected, match="U\\+001F"):
                await client.generate([1, 2], SamplingParams(max_tokens=1), request_id="a\x1fb")
            ok = await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
            assert len(ok.token_ids) >= 1
    finally:
        await node.stop()
