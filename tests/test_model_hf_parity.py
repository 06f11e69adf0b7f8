"""Greedy serving output equals transformers, token for token, on tiny random checkpoints.

Requests run through the PlanExecutor as mixed chunked-prefill batches (decodes of earlier
requests beside prefill chunks of later ones) under a small token budget.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import (
    TINY_DIMS,
    all_position_logits,
    llama3_rope,
    random_prompts,
    save_checkpoint,
    transformers_greedy,
    yarn_rope,
)

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanExecutor, tiny_llama_dir

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (5, 13, 29, 40)
NEW_TOKENS = 32
TOKENS_PER_BLOCK = 4

COMMON = TINY_DIMS

CHECKPOINTS = {
    "llama-llama3-rope": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        rope_scaling=llama3_rope(32),
    ),
    "llama-linear-rope-tied": lambda: transformers.LlamaConfig(
        **COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True
    ),
    "qwen2-bias-tied": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    # a window far shorter than prompt + output, on every layer
    "mistral-window": lambda: transformers.MistralConfig(**COMMON, sliding_window=7),
    # layer 0 attends fully, layer 1 over a window (max_window_layers)
    "qwen2-some-layers-slide": lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=9, max_window_layers=1
    ),
    # head_dim 24 is not hidden_size / heads (16): Qwen3 states its own
    "qwen3-untied": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, rope_theta=1e6),
    "qwen3-yarn-tied": lambda: transformers.Qwen3Config(
        **COMMON, head_dim=24, rope_theta=1e6, rope_scaling=yarn_rope(32), tie_word_embeddings=True
    ),
}


def save(name: str, root: Path) -> Path:
    return save_checkpoint(CHECKPOINTS[name](), root / name, seed=zlib.crc32(name.encode()))


def prompts(vocab: int) -> list[list[int]]:
    return random_prompts(PROMPT_LENGTHS, vocab, seed=7)


def hf_greedy(model_dir: Path, prompt_list: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(model_dir, prompt_list, NEW_TOKENS)


def serve_greedy(
    runner: ModelRunner, prompt_list: list[list[int]], token_budget: int
) -> list[list[int]]:
    """A minimal scheduler: one request arrives per iteration; decodes first, then prefill
    chunks under ``token_budget``; blocks handed out as the sequences grow."""
    executor = PlanExecutor(runner)
    bs = runner.tokens_per_block
    free = list(range(runner.num_blocks - 1, 0, -1))
    computed = [0] * len(prompt_list)
    blocks: list[list[int]] = [[] for _ in prompt_list]
    outputs: list[list[int]] = [[] for _ in prompt_list]
    admitted, finished_ids = 0, []
    iteration = 0
    while any(len(o) < NEW_TOKENS for o in outputs):
        if admitted < len(prompt_list):
            admitted += 1
        new, steps, budget = [], [], token_budget
        active = [i for i in range(admitted) if len(outputs[i]) < NEW_TOKENS]
        decodes = [i for i in active if computed[i] >= len(prompt_list[i])]
        prefills = [i for i in active if computed[i] < len(prompt_list[i])]
        for i in decodes + prefills:
            total = len(prompt_list[i]) + len(outputs[i])
            n = min(total - computed[i], budget)
            if n <= 0:
                continue
            budget -= n
            grow = [free.pop() for _ in range(math.ceil((computed[i] + n) / bs) - len(blocks[i]))]
            if computed[i] == 0 and not blocks[i]:
                blocks[i] = grow
                new.append(
                    NewSequence(
                        request_id=f"r{i}",
                        prompt_token_ids=prompt_list[i],
                        sampling=SamplingParams(max_tokens=NEW_TOKENS),
                        num_cached_tokens=0,
                        block_ids=grow,
                    )
                )
                steps.append(SequenceStep(f"r{i}", n))
            else:
                blocks[i] += grow
                steps.append(SequenceStep(f"r{i}", n, grow))
            computed[i] += n
        plan = StepPlan(iteration=iteration, new=new, steps=steps, finished=finished_ids)
        result = executor.execute(plan)
        finished_ids = []
        for s in result.sampled:
            i = int(s.request_id[1:])
            outputs[i].append(s.token_id)
            if len(outputs[i]) == NEW_TOKENS:
                finished_ids.append(s.request_id)
                free.extend(blocks[i])
        iteration += 1
    return outputs


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory) -> Path:
    return save(request.param, tmp_path_factory.mktemp("ckpt"))


def make_runner(model_dir: Path) -> ModelRunner:
    kv = KVConfig(tokens_per_block=TOKENS_PER_BLOCK, num_blocks=256)
    return ModelRunner(ModelConfig(dtype="float32"), kv, model_dir, "cpu")


def test_mixed_chunked_greedy_matches_transformers(checkpoint: Path) -> None:
    runner = make_runner(checkpoint)
    prompt_list = prompts(runner.vocab_size)
    assert serve_greedy(runner, prompt_list, token_budget=11) == hf_greedy(checkpoint, prompt_list)


def test_chunk_sizes_give_the_same_tokens(checkpoint: Path) -> None:
    runner = make_runner(checkpoint)
    prompt_list = prompts(runner.vocab_size)
    one_shot = serve_greedy(runner, prompt_list, token_budget=1000)
    for budget in (3, 8, 17):
        assert serve_greedy(runner, prompt_list, token_budget=budget) == one_shot


def test_all_position_logits_match_transformers(checkpoint: Path) -> None:
    runner = make_runner(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    prompt_list = prompts(runner.vocab_size)[:3]
    logits = all_position_logits(runner, prompt_list, "cpu")
    with torch.no_grad():
        for p, ours in zip(prompt_list, logits, strict=True):
            ref = hf(torch.tensor([p])).logits[0].float()
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_embedded_tiny_model_matches_transformers() -> None:
    model_dir = tiny_llama_dir()
    runner = ModelRunner(ModelConfig(), KVConfig(tokens_per_block=16, num_blocks=64), None, "cpu")
    assert runner.model_name == model_dir.name and runner.vocab_size == 512
    prompt_list = prompts(runner.vocab_size)[:2]
    assert serve_greedy(runner, prompt_list, token_budget=16) == hf_greedy(model_dir, prompt_list)
