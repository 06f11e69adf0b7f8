"""The transformers peer: the same weights as a ``LlamaForCausalLM`` and the same request set
through transformers' continuous batching (the manager behind ``generate_batch``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from greenroom.models.arch import ArchConfig
from greenroom.models.loader import ModelWeights


def hf_llama(
    arch_dict: dict[str, Any],
    arch: ArchConfig,
    w: ModelWeights,
    device: torch.device,
    attn_implementation: str | None = None,
):
    """``LlamaForCausalLM`` whose parameters are views of ``w`` (no second copy)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = {k: v for k, v in arch_dict.items() if k not in ("architectures", "torch_dtype")}
    config = transformers.LlamaConfig(**cfg, dtype=w.embed.dtype)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)

    def put(module: torch.nn.Module, tensor: torch.Tensor) -> None:
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)

    q, kv, inter = arch.q_size, arch.kv_size, arch.intermediate_size
    put(model.model.embed_tokens, w.embed)
    put(model.lm_head, w.lm_head)
    put(model.model.norm, w.norm)
    for layer, lw in zip(model.model.layers, w.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        put(attn.q_proj, lw.qkv[:q])
        put(attn.k_proj, lw.qkv[q : q + kv])
        put(attn.v_proj, lw.qkv[q + kv :])
        put(attn.o_proj, lw.o)
        put(mlp.gate_proj, lw.gate_up[:inter])
        put(mlp.up_proj, lw.gate_up[inter:])
        put(mlp.down_proj, lw.down)
        put(layer.input_layernorm, lw.input_norm)
        put(layer.post_attention_layernorm, lw.post_norm)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers model still has meta tensors: {meta[:5]}")
    return model.eval()


def generate_continuous(
    model,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    cb_config: dict[str, Any] | None = None,
    result_timeout_s: float = 600.0,
) -> dict:
    """Run every request through transformers' continuous batching, greedy, EOS ignored.

    ``generate_batch`` takes one ``max_new_tokens`` for all inputs; to run the same request
    set as the server (each request its own output length) this drives the same manager with
    one ``add_request`` per request. Manager start-up and warm-up (CUDA graph capture) are
    outside the timed part, which runs from the first ``add_request`` to the last result.
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=-1, pad_token_id=0
    )
    cbc = ContinuousBatchingConfig(**(cb_config or {}))
    with model.continuous_batching_context_manager(
        generation_config=gen, block=True, timeout=30, continuous_batching_config=cbc
    ) as manager:
        started = time.perf_counter()
        ids = [
            manager.add_request(list(p), max_new_tokens=n, eos_token_id=-1)
            for p, n in zip(prompts, max_tokens, strict=True)
        ]
        results: dict[str, Any] = {}
        deadline = started + result_timeout_s
        while len(results) < len(ids):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"transformers finished {len(results)} of {len(ids)} requests")
            out = manager.get_result(timeout=1.0)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            if out.is_finished():
                results[out.request_id] = out
        seconds = time.perf_counter() - started
    errors = [r.error for r in results.values() if r.error is not None]
    if errors:
        raise RuntimeError(f"transformers failed {len(errors)} requests: {errors[0]}")
    produced = [len(results[i].generated_tokens) for i in ids]
    return {
        "num_requests": len(ids),
        "output_tokens": sum(produced),
        "short_outputs": sum(p < n for p, n in zip(produced, max_tokens, strict=True)),
        "seconds": seconds,
        "output_tokens_per_s": sum(produced) / seconds,
        "api": "continuous_batching_context_manager + add_request (generate_batch's manager)",
    }


__all__ = ["generate_continuous", "hf_llama"]
