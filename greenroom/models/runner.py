"""ModelRunner: weights, the paged KV pool and decode CUDA graphs of one model on one device."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from greenroom.config import KVConfig, ModelConfig
from greenroom.kv.helix_placement import HelixPlacement
from greenroom.logging import get_logger
from greenroom.models.arch import DTYPES, ArchConfig
from greenroom.models.batch import ForwardBatch
from greenroom.models.cuda_graphs import DecodeGraphs, default_batch_sizes
from greenroom.models.helix_batch import HelixRank, HelixView
from greenroom.models.kv_pool import allocate_kv_pool, bytes_per_block, plan_num_blocks
from greenroom.models.llama import LlamaModel, StageActivations
from greenroom.models.loader import ModelWeights, load_weights, random_weights
from greenroom.models.max_len import decide_max_model_len
from greenroom.models.nano_batches import NanoBatches
from greenroom.models.prefill_graphs import (
    DEFAULT_MAX_REQUESTS,
    PrefillGraphs,
    default_token_sizes,
)
from greenroom.models.presets import is_preset, preset_config
from greenroom.models.tiny import tiny_llama_dir
from greenroom.parallel.comm import TensorParallel
from greenroom.parallel.shard import TPShard
from greenroom.parallel.stages import PipelineStage, stage_of

log = get_logger(__name__)

# decode: graphs captured by capture_cuda_graphs (on the generation partition under SM
# disaggregation); decode_whole: a second decode and mixed-step set on a whole-GPU stream (SM
# disaggregation, while the context engine idles); prefill: the context engine's prefill graphs
GraphKind = Literal["decode", "decode_whole", "prefill", "none"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on CUDA (float32 stays float32), float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    return arch.dtype if device.type == "cuda" else torch.float32


class ModelRunner:
    """Runs forwards of flat varlen batches over the paged KV pool.

    ``model_dir`` None serves ``model_cfg.path``, or the embedded tiny Llama when that is
    None too. ``device`` None follows ``model_cfg.device``. With ``tp`` (a tensor-parallel
    rank), the runner holds that rank's weight slices and a KV pool of its KV heads only;
    ``arch`` is then the rank's local shape. With ``pp`` (stage index, stage count, optional
    per-stage layer counts), it holds one pipeline stage: its layers, their KV pool, and the
    embedding (first stage) or final norm and LM head (last stage); ``arch`` is the stage's.
    With ``helix`` (True: ``tp`` is the Helix CP group; a TensorParallel: the CP group, and
    ``tp`` the CP x TP group of ``cp * tp`` ranks, rank ``c * tp + t``): the rank keeps every
    attention head of its TP slice, its pool holds its share of every request's blocks
    (``num_blocks`` per rank, the KV manager numbers ``cp_size * num_blocks``) and decode runs
    eagerly (no CUDA graphs yet).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        kv_cfg: KVConfig,
        model_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        tp: TensorParallel | None = None,
        pp: tuple[int, int, tuple[int, ...]] = (0, 1, ()),
        helix: bool | TensorParallel = False,
    ) -> None:
        device = resolve_device(device if device is not None else model_cfg.device)
        tp = tp or TensorParallel.single()
        cp = tp if helix is True else helix or None
        self._cp = cp if cp is not None and cp.size > 1 else None
        helix_tp = tp.size // cp.size if self._cp is not None else 1
        helix = self._cp is not None
        source = str(model_dir or model_cfg.path or "")
        if is_preset(source):  # random weights of a named shape, made on the device
            arch = ArchConfig.from_dict(preset_config(source), source=source)
            shard = TPShard.of(arch, tp.rank, tp.size, helix, helix_tp) if tp.size > 1 else None
            stage = stage_of(arch.num_layers, *pp)
            dtype = resolve_dtype(model_cfg.dtype, arch, device)
            weights = random_weights(
                arch, dtype, device, seed=model_cfg.seed, shard=shard, stage=stage
            )
            self._setup(model_cfg, kv_cfg, arch, weights, dtype, device, source, tp, stage)
            return
        path = Path(model_dir or model_cfg.path or tiny_llama_dir())
        arch = ArchConfig.from_dir(path)
        shard = TPShard.of(arch, tp.rank, tp.size, helix, helix_tp) if tp.size > 1 else None
        stage = stage_of(arch.num_layers, *pp)
        dtype = resolve_dtype(model_cfg.dtype, arch, device)
        weights = load_weights(path, arch, dtype, device, shard, stage)
        self._setup(model_cfg, kv_cfg, arch, weights, dtype, device, path.name, tp, stage)

    @classmethod
    def from_weights(
        cls,
        model_cfg: ModelConfig,
        kv_cfg: KVConfig,
        arch: ArchConfig,
        weights: ModelWeights,
        device: str | torch.device,
        name: str = "random",
    ) -> ModelRunner:
        """A runner over weights already on ``device`` (benchmarks, tests)."""
        runner = cls.__new__(cls)
        runner._cp = None
        device = torch.device(device)
        dtype = (weights.embed if weights.embed is not None else weights.lm_head).dtype
        runner._setup(model_cfg, kv_cfg, arch, weights, dtype, device, name)
        return runner

    def _setup(
        self,
        model_cfg: ModelConfig,
        kv_cfg: KVConfig,
        arch: ArchConfig,
        weights: ModelWeights,
        dtype: torch.dtype,
        device: torch.device,
        name: str,
        tp: TensorParallel | None = None,
        stage: PipelineStage | None = None,
    ) -> None:
        self.tp = tp = tp or TensorParallel.single()
        self.stage = stage = stage or PipelineStage.whole(arch.num_layers)
        cp = getattr(self, "_cp", None)
        if tp.size > 1:
            helix_tp = tp.size // cp.size if cp is not None else 1
            arch = TPShard.of(arch, tp.rank, tp.size, cp is not None, helix_tp).local_arch(arch)
        if stage.size > 1:
            windows = arch.layer_windows[stage.first_layer : stage.end_layer]
            arch = replace(arch, num_layers=stage.num_layers, layer_windows=windows)
        self.model_cfg, self.kv_cfg, self.arch = model_cfg, kv_cfg, arch
        self.device, self.dtype, self.model_name = device, dtype, name
        self.tokens_per_block = kv_cfg.tokens_per_block
        max_len, notes = decide_max_model_len(model_cfg, arch, name)
        for note in notes:
            log.warning(note)
        self.max_model_len = max_len
        self.max_blocks_per_seq = -(-max_len // self.tokens_per_block)
        self.vocab_size = arch.vocab_size
        self.eos_token_ids = list(arch.eos_token_ids)
        self.model = LlamaModel(arch, weights, max_len, device, tp, stage)
        self.num_blocks = self._agree_num_blocks(plan_num_blocks(kv_cfg, arch, dtype, device))
        self.kv_pool = allocate_kv_pool(self.num_blocks, arch, self.tokens_per_block, dtype, device)
        self.block_bytes = bytes_per_block(arch, self.tokens_per_block, dtype)
        self.helix: HelixRank | None = None
        if cp is not None:
            placement = HelixPlacement(cp.size, self.tokens_per_block)
            self.helix = HelixRank(
                placement, cp.rank, self.num_blocks, cp.group, kv_cfg.host_blocks
            )
            self.model.helix = self.helix
        self._enable_nano_batches(cp is not None)
        self.graphs: DecodeGraphs | None = None
        self.whole_graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # small mixed steps (prompt chunks beside decode rows) of the engine that replays
        # ``graphs``, captured on its stream with them; ``whole_mixed_graphs``: the same on
        # the whole-GPU stream, with ``whole_graphs``
        self.mixed_graphs: PrefillGraphs | None = None
        self.whole_mixed_graphs: PrefillGraphs | None = None

    def _enable_nano_batches(self, helix: bool) -> None:
        """Decode steps as nano-batches (``model.decode_nano_batches``) on one rank serving the
        whole model; a layer's all-reduce or a stage's send would need both halves."""
        if not self.model_cfg.decode_nano_batches:
            return
        if self.tp.size > 1 or self.stage.size > 1 or helix:
            log.warning(
                "model.decode_nano_batches is ignored under tensor, pipeline or Helix parallelism"
            )
            return
        cfg = self.model_cfg
        self.model.nano = NanoBatches(cfg.nano_batch_min_rows, cfg.nano_batch_attention_stream)

    def _agree_num_blocks(self, num_blocks: int) -> int:
        """Every rank of a TP group and every pipeline stage must number the same blocks (the
        KV manager's): the smallest pool wins."""
        if self.tp.size == 1 and self.stage.size == 1:
            return num_blocks
        import torch.distributed as dist

        if not dist.is_initialized():  # stages in one process (tests)
            return num_blocks
        group = self.tp.group if self.stage.size == 1 else None  # None: every rank
        t = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return int(t.item())

    def capture_cuda_graphs(
        self,
        stream: torch.cuda.Stream | None = None,
        batch_sizes: list[int] | None = None,
        whole_gpu: bool = False,
    ) -> list[int]:
        """Capture decode graphs, and mixed-step graphs up to
        ``model.cuda_graph_max_mixed_tokens``, on ``stream``; returns the decode batch sizes
        captured (none on CPU or with ``model.cuda_graphs = false``). ``whole_gpu``: the second
        set, replayed as ``graphs="decode_whole"`` (SM disaggregation's generation engine,
        while the context engine idles): a graph keeps the SM partition of the stream it was
        captured on, so a mixed step on the whole GPU needs graphs captured there too. Each
        set has its own memory pool; mixed graphs keep ``[min(max mixed tokens, max batch),
        vocab]`` float32 logits per token size (about 0.5 GiB for a 128k vocabulary at the
        defaults)."""
        if (
            self.device.type != "cuda"
            or not self.model_cfg.cuda_graphs
            or self.stage.size > 1
            or self.helix
        ):
            return []  # pipeline stages run eagerly (a graph would hold the stage's send/recv)
        sizes = batch_sizes or default_batch_sizes(self.model_cfg.cuda_graph_max_batch_size)
        graphs = DecodeGraphs(self.model, self.kv_pool, self.max_blocks_per_seq, sizes, stream)
        if whole_gpu:
            self.whole_graphs = graphs
            self.whole_mixed_graphs = self._capture_mixed_graphs(stream)
        else:
            self.graphs = graphs
            self.mixed_graphs = self._capture_mixed_graphs(stream)
        return graphs.batch_sizes

    def _capture_mixed_graphs(self, stream: torch.cuda.Stream | None) -> PrefillGraphs | None:
        max_tokens = self.model_cfg.cuda_graph_max_mixed_tokens
        if not max_tokens:
            return None
        return PrefillGraphs(
            self.model,
            self.kv_pool,
            self.max_blocks_per_seq,
            default_token_sizes(max_tokens),
            min(max_tokens, self.model_cfg.cuda_graph_max_batch_size),
            stream,
        )

    def capture_prefill_graphs(
        self,
        stream: torch.cuda.Stream | None = None,
        max_num_tokens: int = 2048,
        max_requests: int = DEFAULT_MAX_REQUESTS,
    ) -> list[int]:
        """Capture prefill graphs on ``stream`` for batches of up to ``max_num_tokens`` tokens
        and ``max_requests`` requests; returns the token sizes captured (none on CPU or with
        ``model.cuda_graphs = false``)."""
        if (
            self.device.type != "cuda"
            or not self.model_cfg.cuda_graphs
            or self.stage.size > 1
            or self.helix
        ):
            return []
        self.prefill_graphs = PrefillGraphs(
            self.model,
            self.kv_pool,
            self.max_blocks_per_seq,
            default_token_sizes(max_num_tokens),
            max_requests,
            stream,
        )
        return self.prefill_graphs.token_sizes

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        graphs: GraphKind = "decode",
        inputs: StageActivations | None = None,
    ) -> torch.Tensor:
        """float32 logits ``[num_requests, vocab]`` (``[num_tokens, vocab]`` with all_logits).

        ``graphs``: which captured graphs may run the batch (each engine replays only those
        captured on its own stream); a batch no graph fits runs eagerly. A pipeline stage
        runs from ``inputs`` (after the first) and, before the last, returns the (hidden,
        residual) for the next stage instead of logits.
        """
        if self.stage.size > 1:
            return self.model.forward(batch, self.kv_pool, inputs)  # type: ignore[return-value]
        return self.forward_greedy(batch, graphs)[0]

    @torch.inference_mode()
    def forward_greedy(
        self,
        batch: ForwardBatch,
        graphs: GraphKind = "decode",
        inputs: StageActivations | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits as ``forward`` gives them, their row argmax when a decode graph computed it
        with the forward, else None)."""
        if self.stage.size > 1:
            return self.model.forward(batch, self.kv_pool, inputs), None  # type: ignore[return-value]
        if graphs in ("decode", "decode_whole"):
            whole = graphs == "decode_whole"
            decode = self.whole_graphs if whole else self.graphs
            if decode is not None and decode.can_run(batch):
                return decode.run_greedy(batch)
            mixed = self.whole_mixed_graphs if whole else self.mixed_graphs
            if not batch.decode_only and mixed is not None and mixed.can_run(batch):
                return mixed.run(batch), None
        if (
            graphs == "prefill"
            and self.prefill_graphs is not None
            and self.prefill_graphs.can_run(batch)
        ):
            return self.prefill_graphs.run(batch), None
        return self.model.forward(batch, self.kv_pool), None

    @property
    def total_blocks(self) -> int:
        """Blocks the KV manager numbers: every CP rank's pool on a Helix rank."""
        return self.num_blocks * (self.helix.cp_size if self.helix else 1)

    def build_batch(self, chunks, all_logits: bool = False) -> ForwardBatch:
        batch = ForwardBatch.build(chunks, self.tokens_per_block, self.device, all_logits)
        if self.helix is not None:
            batch.helix = HelixView.build(chunks, self.helix, self.device)
        return batch
