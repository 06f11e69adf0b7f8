"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) over a paged KV pool.

Read top to bottom: embed, then per layer RMSNorm -> fused QKV (optional bias) -> per-head
q/k RMSNorm (Qwen3) -> RoPE -> KV write -> paged attention (over the layer's sliding window,
if it has one) -> O projection -> RMSNorm (+residual) -> SwiGLU; final norm; the LM head runs
only on the rows whose logits are asked for. Each layer is three pieces, ``pre`` (up to and
including the KV write), ``attend`` and ``post`` (O projection and MLP): the plain loop runs
them in turn; a large decode-only batch may run them as two nano-batches on two streams
(greenroom.models.nano_batches), one half's attention beside the other's matmuls.

Tensor parallel (``tp``, see greenroom.parallel.shard): ``arch`` is the rank's local shape
(its heads, its intermediate slice); the O projection and the down projection are
row-parallel and followed by an all-reduce; the embedding and the LM head hold a padded slice
of the vocabulary (embedding: look up the ids this rank owns, all-reduce; LM head: all-gather
the logits and cut the padding), so every rank ends with the same full logits.

Pipeline parallel (``stage``): the model holds the stage's layers only and ``arch`` is the
stage's (its layer count and windows); a stage after the first takes the previous stage's
hidden state and residual instead of embedding, and a stage before the last returns them
instead of the final norm.

Helix context parallel (``helix``): ``tp`` is the CP group and the rank keeps every attention
head; each layer attends over the rank's KV shard, exchanges the partials (one all-to-all,
greenroom.models.helix_attention) and hands the o_proj its head slice; the rest is as TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from greenroom.kernels import ops
from greenroom.models.arch import ArchConfig
from greenroom.models.batch import ForwardBatch
from greenroom.models.helix_attention import helix_decode_attention, helix_prefill_attention
from greenroom.models.helix_batch import HelixRank
from greenroom.models.loader import ModelWeights
from greenroom.models.nano_batches import NanoBatches, run_nano_batches
from greenroom.models.rope import cos_sin_cache
from greenroom.parallel.comm import TensorParallel
from greenroom.parallel.stages import PipelineStage

StageActivations = tuple[torch.Tensor, torch.Tensor]  # hidden state, residual


class LlamaModel:
    def __init__(
        self,
        arch: ArchConfig,
        weights: ModelWeights,
        max_position: int,
        device: torch.device,
        tp: TensorParallel | None = None,
        stage: PipelineStage | None = None,
    ) -> None:
        self.helix: HelixRank | None = None  # set by the runner on a Helix CP rank
        # decode steps as two overlapped nano-batches (greenroom.models.nano_batches); set by
        # the runner where it applies (one rank, the whole model)
        self.nano: NanoBatches | None = None
        self.arch = arch
        self.weights = weights
        self.tp = tp or TensorParallel.single()
        self.stage = stage or PipelineStage.whole(arch.num_layers)
        self.vocab_size = arch.vocab_size
        vocab_rows = weights.embed if weights.embed is not None else weights.lm_head
        rows = vocab_rows.shape[0] if vocab_rows is not None else 0  # middle stages: none
        self.vocab_start = self.tp.rank * rows
        self.scale = arch.head_dim**-0.5
        self.cos_sin = cos_sin_cache(
            arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling, device
        )

    def hidden_states(self, batch: ForwardBatch, kv_pool: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[T, hidden]``; writes the batch's K/V into ``kv_pool``."""
        return self.run_layers(batch, kv_pool)  # type: ignore[return-value]

    def run_layers(
        self,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        inputs: StageActivations | None = None,
    ) -> torch.Tensor | StageActivations:
        """This stage's layers: from the embedding (first stage) or ``inputs``; the final-norm
        hidden states on the last stage, else the (hidden, residual) for the next."""
        if inputs is None and self.nano is not None and self.nano.splits(batch):
            h, residual = run_nano_batches(self, batch, kv_pool, self.nano.streams(kv_pool.device))
        else:
            h, residual = (self.embed(batch.input_ids), None) if inputs is None else inputs
            for index in range(self.num_layers):
                q, residual = self.pre(index, h, residual, batch, kv_pool)
                attn = self.attend(index, q, batch, kv_pool)
                h, residual = self.post(index, attn, residual)
        if not self.stage.is_last:
            return h, residual
        out, _ = ops.fused_add_rms_norm(h, residual, self.weights.norm, self.arch.rms_norm_eps)
        return out

    @property
    def num_layers(self) -> int:
        return len(self.weights.layers)

    def pre(
        self,
        index: int,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` up to attention: add + RMSNorm, QKV, q/k norms, rotary, KV write;
        returns (q, residual)."""
        arch, layer, n = self.arch, self.weights.layers[index], h.shape[0]
        x, residual = ops.fused_add_rms_norm(h, residual, layer.input_norm, arch.rms_norm_eps)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([arch.q_size, arch.kv_size, arch.kv_size], dim=-1)
        q = q.view(n, arch.num_heads, arch.head_dim)
        k = k.view(n, arch.num_kv_heads, arch.head_dim)
        v = v.view(n, arch.num_kv_heads, arch.head_dim)
        if layer.q_norm is not None:
            q = ops.rms_norm(q, layer.q_norm, arch.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, arch.rms_norm_eps)
        k_cache, v_cache, slots = kv_pool[:, index, 0], kv_pool[:, index, 1], self._slots(batch)
        if self.cos_sin.shape[-1] == arch.head_dim:  # rotary over the whole head: one pass
            q = ops.rotary_write_kv(q, k, v, batch.positions, self.cos_sin, k_cache, v_cache, slots)
            return q, residual
        q, k = ops.apply_rotary(q, k, batch.positions, self.cos_sin)
        ops.write_kv_cache(k, v, k_cache, v_cache, slots)
        return q, residual

    def attend(
        self, index: int, q: torch.Tensor, batch: ForwardBatch, kv_pool: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``index``'s paged attention of ``q`` over the KV pool (written by ``pre``)."""
        k_cache, v_cache = kv_pool[:, index, 0], kv_pool[:, index, 1]
        return self._attention(q, k_cache, v_cache, batch, self.arch.window(index))

    def post(
        self, index: int, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` after attention: O projection, add + RMSNorm, SwiGLU MLP; returns
        (hidden, residual)."""
        arch, layer = self.arch, self.weights.layers[index]
        h = self.tp.all_reduce(F.linear(attn.reshape(attn.shape[0], -1), layer.o, layer.o_bias))
        x, residual = ops.fused_add_rms_norm(h, residual, layer.post_norm, arch.rms_norm_eps)
        act = ops.silu_and_mul(F.linear(x, layer.gate_up))
        return self.tp.all_reduce(F.linear(act, layer.down)), residual

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weights.embed)
        local = ids - self.vocab_start
        rows = self.weights.embed.shape[0]
        outside = (local < 0) | (local >= rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weights.embed)
        return self.tp.all_reduce(h.masked_fill(outside.unsqueeze(-1), 0.0))

    def _attention(self, q, k_cache, v_cache, batch: ForwardBatch, window: int = 0) -> torch.Tensor:
        """``window``: the layer's sliding window (0: full attention)."""
        if self.helix is not None:
            return self._helix_attention(q, k_cache, v_cache, batch)
        if batch.decode_only:
            return ops.paged_decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, self.scale,
                window=window,
            )  # fmt: skip
        d = batch.decode_rows  # 0 in graph-captured batches (their tiles cover every row)
        if d and batch.chunk_rows is not None:
            decode = ops.paged_decode_attention(
                q[:d], k_cache, v_cache, batch.block_tables[:d], batch.context_lens[:d],
                self.scale, window=window,
            )  # fmt: skip
            tables, cu_seqlens, context_lens = batch.chunk_rows
            chunks = ops.paged_prefill_attention(
                q[d:], k_cache, v_cache, tables, cu_seqlens, context_lens, self.scale,
                batch.max_seqlen_q, window=window,
            )  # fmt: skip
            return torch.cat([decode, chunks])
        return ops.paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.cu_seqlens_q,
            batch.context_lens,
            self.scale,
            batch.max_seqlen_q,
            tiles=batch.attention_tiles,
            window=window,
        )

    def _slots(self, batch: ForwardBatch) -> torch.Tensor:
        """The KV slots the batch's new tokens go to (a Helix rank's: its own)."""
        if self.helix is None:
            return batch.slot_mapping
        if batch.helix is None or batch.host_lens is None:
            raise ValueError("a Helix rank needs batches built with their Helix view")
        return batch.helix.slot_mapping

    def _helix_attention(self, q, k_cache, v_cache, batch: ForwardBatch) -> torch.Tensor:
        view, helix = batch.helix, self.helix
        assert view is not None and batch.host_lens is not None  # checked by _slots
        if batch.decode_only:
            return helix_decode_attention(
                q, k_cache, v_cache, view.block_tables, view.shard_lens, self.scale, helix.group
            )
        return helix_prefill_attention(
            q, k_cache, v_cache, view, batch.positions, batch.host_lens[0], helix, self.scale
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the given hidden rows (the full vocabulary on every rank)."""
        logits = F.linear(hidden, self.weights.lm_head).float()
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last(logits)[:, : self.vocab_size]

    def forward(
        self,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        inputs: StageActivations | None = None,
    ) -> torch.Tensor | StageActivations:
        """Logits (last stage), or the activations for the next stage."""
        hidden = self.run_layers(batch, kv_pool, inputs)
        if not self.stage.is_last:
            return hidden
        if not batch.all_logits:
            hidden = hidden.index_select(0, batch.logits_indices)
        return self.logits(hidden)
