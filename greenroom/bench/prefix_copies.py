"""Host-tier onboarding bandwidth: the engine's onboard copies against one plain pinned copy.

The engine runs a plan's ``BlockCopy`` list in ``PlanExecutor`` (one copy per block, on a side
stream). Here a real executor with a model's KV layout (Llama-3.1-8B: 32 layers x K/V x 16
tokens x 8 heads x 128, bf16 = 2 MiB a block) onboards a batch of blocks in random order, and
the same bytes go host -> device in one ``copy_(non_blocking=True)`` from pinned memory: the
ratio of the two times is the fraction of the link's measured bandwidth the engine reaches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from greenroom.bench.timing import median_seconds
from greenroom.bus.messages import BlockCopy, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.models.arch import ArchConfig
from greenroom.models.executor import PlanExecutor
from greenroom.models.loader import random_weights
from greenroom.models.presets import PRESETS
from greenroom.models.runner import ModelRunner


def kv_layout_arch(preset: str = "llama-3.1-8b", dtype: str | None = None) -> ArchConfig:
    """An architecture with ``preset``'s KV layout (layers, KV heads, head dim) and minimal
    everything else, so its weights take almost no memory."""
    cfg = dict(PRESETS[preset])
    heads = cfg["num_key_value_heads"]
    cfg.update(
        num_attention_heads=heads,
        hidden_size=heads * cfg["head_dim"],
        intermediate_size=256,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    if dtype is not None:
        cfg["torch_dtype"] = dtype
    return ArchConfig.from_dict(cfg, source=f"kv-layout:{preset}")


def build_executor(
    arch: ArchConfig, num_blocks: int, host_blocks: int, tokens_per_block: int, device
) -> PlanExecutor:
    """A PlanExecutor over a pool of ``num_blocks`` GPU blocks (the null block included)."""
    device = torch.device(device)
    dtype = arch.dtype if device.type == "cuda" else torch.float32
    model_cfg = ModelConfig(max_model_len=4096, cuda_graphs=False)
    kv_cfg = KVConfig(tokens_per_block=tokens_per_block, num_blocks=num_blocks)
    weights = random_weights(arch, dtype, device)
    runner = ModelRunner.from_weights(model_cfg, kv_cfg, arch, weights, device, "kv-layout")
    return PlanExecutor(runner, host_blocks=host_blocks)


def onboard_bandwidth(
    batch_sizes: tuple[int, ...] = (16, 64, 256),
    *,
    preset: str = "llama-3.1-8b",
    tokens_per_block: int = 16,
    device: str = "cuda",
    reps: int = 20,
    warmup: int = 3,
    seed: int = 0,
) -> dict:
    """Per batch size: plain pinned copy vs the executor's onboards (random and consecutive
    block ids) and offloads; GB/s and the executor's fraction of the plain copy's bandwidth."""
    dev = torch.device(device)
    arch = kv_layout_arch(preset)
    n_max = max(batch_sizes)
    ex = build_executor(arch, n_max + 1, n_max, tokens_per_block, dev)
    gpu, host = ex.runner.kv_pool, ex.host_pool
    assert host is not None
    block_bytes = gpu[0].numel() * gpu.element_size()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    host.copy_(torch.randn(host.shape, dtype=host.dtype, device=dev))
    pinned = dev.type == "cuda"
    src = torch.empty((n_max, *gpu.shape[1:]), dtype=gpu.dtype, pin_memory=pinned)
    src.copy_(host)
    dst = torch.empty_like(src, device=dev)

    def onboard(copies: list[BlockCopy]) -> Callable[[], object]:
        plan = StepPlan(iteration=0, copies=copies)
        return lambda: ex.execute(plan)

    rows = []
    for n in batch_sizes:
        host_ids = torch.randperm(n_max, generator=gen)[:n].tolist()
        gpu_ids = (torch.randperm(n_max, generator=gen)[:n] + 1).tolist()
        random_in = [BlockCopy("onboard", h, g) for h, g in zip(host_ids, gpu_ids, strict=True)]
        runs_in = [BlockCopy("onboard", i, i + 1) for i in range(n)]
        random_out = [BlockCopy("offload", g, h) for h, g in zip(host_ids, gpu_ids, strict=True)]
        ex.execute(StepPlan(iteration=0, copies=random_in))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        for h, g in list(zip(host_ids, gpu_ids, strict=True))[:4]:
            if not torch.equal(gpu[g].cpu(), host[h]):
                raise AssertionError(f"onboard of host block {h} into GPU block {g} is wrong")
        plain_src, plain_dst = src[:n], dst[:n]
        times = {
            "plain": median_seconds(
                lambda s=plain_src, d=plain_dst: d.copy_(s, non_blocking=True), dev, reps, warmup
            ),
            "onboard_random": median_seconds(onboard(random_in), dev, reps, warmup),
            "onboard_consecutive": median_seconds(onboard(runs_in), dev, reps, warmup),
            "offload_random": median_seconds(onboard(random_out), dev, reps, warmup),
        }
        nbytes = n * block_bytes
        row = {"blocks": n, "mib": round(nbytes / 2**20, 1)}
        for name, t in times.items():
            row[f"{name}_ms"] = round(t * 1e3, 4)
            row[f"{name}_gbps"] = round(nbytes / t / 1e9, 2)
        row["onboard_of_plain"] = round(times["plain"] / times["onboard_random"], 4)
        row["onboard_consecutive_of_plain"] = round(
            times["plain"] / times["onboard_consecutive"], 4
        )
        rows.append(row)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "kv_layout": preset,
        "block_bytes": block_bytes,
        "dtype": str(gpu.dtype).removeprefix("torch."),
        "batches": rows,
        "min_onboard_of_plain": min(r["onboard_of_plain"] for r in rows),
    }
