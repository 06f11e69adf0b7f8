"""Tiny random transformers checkpoints, prompts and all-position logits for the model tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from greenroom.models import ForwardBatch, ModelRunner, SequenceChunk

ARCH_CLASSES = {
    "LlamaConfig": "LlamaForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
}


# The tiny decoder shape the parity tests share (each architecture adds its own fields).
TINY_DIMS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)


def llama3_rope(original_max_position_embeddings: int) -> dict:
    """Llama 3 rope scaling (factor 8) over ``original_max_position_embeddings`` positions."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


def yarn_rope(original_max_position_embeddings: int, factor: float = 4.0) -> dict:
    """YaRN rope scaling, as Qwen3's long-context configs set it."""
    return {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


def save_checkpoint(config, path: Path, seed: int, dtype: torch.dtype | None = None) -> Path:
    """Random weights for a transformers ``config`` (seeded), saved at ``path``."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ARCH_CLASSES[type(config).__name__])(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


@torch.no_grad()
def transformers_greedy(
    model_dir: Path, prompt_list: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, step by step over its KV cache (the
    oracle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outputs = []
    for prompt in prompt_list:
        past, new = None, []
        step_ids = torch.tensor([prompt])
        for _ in range(new_tokens):
            out = model(step_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            step_ids = torch.tensor([[token]])
        outputs.append(new)
    return outputs


def random_prompts(lengths: Sequence[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt per length, token ids in [3, vocab) (clear of the special ids)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def all_position_logits(
    runner: ModelRunner, prompt_list: list[list[int]], device: str
) -> list[torch.Tensor]:
    """One prefill of every prompt (fresh blocks from 1 up); the logits of each prompt."""
    bs = runner.tokens_per_block
    chunks, start = [], 1
    for p in prompt_list:
        n_blocks = math.ceil(len(p) / bs)
        chunks.append(SequenceChunk(p, 0, list(range(start, start + n_blocks))))
        start += n_blocks
    logits = runner.forward(ForwardBatch.build(chunks, bs, device, all_logits=True))
    return list(logits.split([len(p) for p in prompt_list]))
