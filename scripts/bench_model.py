"""Model runner benchmark: decode steps against the memory roofline, prefill against the
matmul rate, and both against transformers with the same weights, all measured in one run.

GPU (default): a Llama-3.1-8B-shaped model with random bf16 weights made on the device.
Decode at batch 1/16/64/256, context 2k, through CUDA graphs; roofline = (all weight bytes +
the batch's KV bytes) / measured device copy bandwidth. Prefill of one 8k-token chunk as a
fraction of the measured bf16 matmul rate. ``--quick``: a tiny shape on CPU (< 60 s).
Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from greenroom.bench.timing import median_seconds
from greenroom.bench.transformers_peer import hf_llama
from greenroom.config import KVConfig, ModelConfig
from greenroom.kernels import ops
from greenroom.models.arch import ArchConfig
from greenroom.models.batch import ForwardBatch, SequenceChunk
from greenroom.models.loader import ModelWeights, random_weights
from greenroom.models.presets import PRESETS
from greenroom.models.runner import ModelRunner

LLAMA_8B = PRESETS["llama-3.1-8b"]

TINY = {
    **LLAMA_8B,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "torch_dtype": "float32",
}


def timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """Median seconds of ``fn`` over ``reps`` runs after ``warmup`` (device events on CUDA)."""
    return lambda fn, reps, warmup: median_seconds(fn, device, reps, warmup)


def copy_bandwidth(device: torch.device, nbytes: int, timed) -> float:
    """Bytes per second of a device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10, 3)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, timed) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(lambda: a @ b, 10, 3)


def weight_bytes(weights: ModelWeights) -> int:
    tensors = [weights.embed, weights.norm] + (
        [] if weights.lm_head is weights.embed else [weights.lm_head]
    )
    for layer in weights.layers:
        tensors += [
            layer.input_norm,
            layer.qkv,
            layer.o,
            layer.post_norm,
            layer.gate_up,
            layer.down,
        ]
        tensors += [t for t in (layer.qkv_bias, layer.o_bias) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_flops(arch: ArchConfig, tokens: int) -> float:
    """Matmul flops of one causal prefill chunk with no cached prefix (LM head: last token)."""
    h, layers = arch.hidden_size, arch.num_layers
    per_token = (
        2 * layers * h * (arch.q_size + 2 * arch.kv_size + arch.q_size + 3 * arch.intermediate_size)
    )
    attention = layers * 2 * tokens * tokens * arch.num_heads * arch.head_dim  # QK^T + PV, causal
    return per_token * tokens + attention + 2 * h * arch.vocab_size


def decode_batch(runner: ModelRunner, batch: int, context: int) -> ForwardBatch:
    per_seq = -(-context // runner.tokens_per_block)
    chunks = [
        SequenceChunk(
            [7 + i % 100], context - 1, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))
        )
        for i in range(batch)
    ]
    return runner.build_batch(chunks)


# --------------------------------------------------------------------------- transformers


def hf_decode_seconds(model, config, arch: ArchConfig, batch: int, context: int, timed) -> float:
    """One decode step of ``batch`` sequences whose DynamicCache holds ``context - 1`` tokens."""
    from transformers import DynamicCache

    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    cache = DynamicCache(config=config)
    shape = (batch, arch.num_kv_heads, context - 1, arch.head_dim)
    for layer in range(arch.num_layers):
        cache.update(
            torch.randn(shape, dtype=dtype, device=device),
            torch.randn(shape, dtype=dtype, device=device),
            layer,
        )
    ids = torch.full((batch, 1), 7, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), context - 1, dtype=torch.long, device=device)
    cache_pos = torch.tensor([context - 1], device=device)

    def step():
        model(input_ids=ids, position_ids=pos, cache_position=cache_pos, past_key_values=cache)
        cache.crop(-1)  # drop the token this step appended

    with torch.inference_mode():
        return timed(step, 5, 2)


def hf_prefill_seconds(model, tokens: int, timed) -> float:
    device = model.lm_head.weight.device
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=device)
    with torch.inference_mode():
        return timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 3, 1)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shape on CPU (< 60 s)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--prefill-tokens", type=int, default=None)
    parser.add_argument(
        "--hf-max-batch", type=int, default=64, help="largest decode batch run through transformers"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    args = parser.parse_args()

    quick = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    arch_dict = TINY if quick else LLAMA_8B
    batch_sizes = [
        int(b) for b in (args.batch_sizes or ("1,4" if quick else "1,16,64,256")).split(",")
    ]
    context = args.context or (128 if quick else 2048)
    prefill_tokens = args.prefill_tokens or (256 if quick else 8192)
    timed = timer(device)
    torch.manual_seed(0)

    bandwidth = copy_bandwidth(device, (256 << 20) if quick else (4 << 30), timed)
    dtype = torch.float32 if quick else torch.bfloat16
    matmul = matmul_rate(device, dtype, 1024 if quick else 8192, timed)

    arch = ArchConfig.from_dict(arch_dict)
    weights = random_weights(arch, dtype, device)
    tpb = 16
    per_seq = -(-max(context, prefill_tokens) // tpb)
    num_blocks = 1 + max(max(batch_sizes) * -(-context // tpb), per_seq)
    model_cfg = ModelConfig(
        max_model_len=max(context, prefill_tokens), cuda_graph_max_batch_size=max(batch_sizes)
    )
    runner = ModelRunner.from_weights(
        model_cfg,
        KVConfig(tokens_per_block=tpb, num_blocks=num_blocks),
        arch,
        weights,
        device,
        "llama-8b-shape",
    )
    runner.kv_pool.normal_()  # realistic KV values; every block is read as context
    graph_sizes = runner.capture_cuda_graphs(batch_sizes=batch_sizes)
    w_bytes = weight_bytes(weights)
    kv_per_token = runner.block_bytes // tpb

    decode = []
    for b in batch_sizes:
        batch = decode_batch(runner, b, context)
        seconds = timed(
            lambda batch=batch: runner.forward(batch), 10 if not quick else 3, 3 if not quick else 1
        )
        roofline = (w_bytes + b * context * kv_per_token) / bandwidth
        decode.append(
            {
                "batch": b,
                "step_ms": seconds * 1e3,
                "roofline_ms": roofline * 1e3,
                "fraction_of_roofline": roofline / seconds,
                "tokens_per_s": b / seconds,
                "cuda_graph": b in graph_sizes,
            }
        )

    prefill_batch = runner.build_batch(
        [SequenceChunk([11] * prefill_tokens, 0, list(range(1, 1 + per_seq)))]
    )
    prefill_s = timed(lambda: runner.forward(prefill_batch), 3 if not quick else 2, 1)
    flops = prefill_flops(arch, prefill_tokens)
    prefill = {
        "tokens": prefill_tokens,
        "ms": prefill_s * 1e3,
        "tokens_per_s": prefill_tokens / prefill_s,
        "tflops": flops / prefill_s / 1e12,
        "fraction_of_matmul_rate": flops / prefill_s / matmul,
    }

    hf: dict = {"skipped": args.no_hf}
    if not args.no_hf:
        del runner.graphs
        runner.graphs = None
        try:
            model = hf_llama(arch_dict, arch, weights, device, attn_implementation="sdpa")
            config = model.config
            for row in decode:
                if row["batch"] <= args.hf_max_batch:
                    hf_s = hf_decode_seconds(model, config, arch, row["batch"], context, timed)
                    row["hf_step_ms"] = hf_s * 1e3
                    row["speedup_vs_hf"] = hf_s * 1e3 / row["step_ms"]
            hf_prefill = hf_prefill_seconds(model, prefill_tokens, timed)
            prefill["hf_ms"] = hf_prefill * 1e3
            prefill["speedup_vs_hf"] = hf_prefill / prefill_s
            hf = {"skipped": False, "attn_implementation": "sdpa", "cache": "DynamicCache"}
        except Exception as exc:  # the baseline must not hide our own numbers
            hf = {"skipped": False, "error": f"{type(exc).__name__}: {exc}"}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    b64 = next((r for r in decode if r["batch"] == 64), None)
    result = {
        "benchmark": "bench_model",
        "device": name,
        "shape": "tiny" if quick else "llama-3.1-8b",
        "dtype": str(dtype).removeprefix("torch."),
        "context": context,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "matmul_tflops": matmul / 1e12,
        "weight_GB": w_bytes / 1e9,
        "kv_bytes_per_token": kv_per_token,
        "kernels": ops.active_backends(device),
        "decode": decode,
        "prefill": prefill,
        "transformers": hf,
        "targets": {
            "decode_b64_fraction_of_roofline": {
                "target": 0.70,
                "value": b64["fraction_of_roofline"] if b64 else None,
            },
            "prefill_fraction_of_matmul_rate": {
                "target": 0.55,
                "value": prefill["fraction_of_matmul_rate"],
            },
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
