"""GPU checks: bf16 logits against transformers, CUDA graph replay against eager."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import all_position_logits, llama3_rope, random_prompts, save_checkpoint

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanExecutor, SequenceChunk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BS = 16
PROMPT_LENGTHS = (5, 37, 100, 64)


GPU_DIMS = dict(
    vocab_size=1000,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.05,
)


def gpu_config(name: str):
    import transformers

    if name == "qwen3":  # q/k norms and a head_dim of its own (not 512 / 8)
        return transformers.Qwen3Config(**GPU_DIMS, head_dim=128, rope_theta=1e6)
    if name == "mistral-window":  # a window shorter than the longer prompts, every layer
        return transformers.MistralConfig(**GPU_DIMS, sliding_window=48)
    return transformers.LlamaConfig(**GPU_DIMS, rope_scaling=llama3_rope(128))


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral-window"])
def checkpoint(request, tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("gpu") / request.param
    return save_checkpoint(gpu_config(request.param), path, seed=0, dtype=torch.bfloat16)


def prompts() -> list[list[int]]:
    return random_prompts(PROMPT_LENGTHS, 1000, seed=3)


def runner_for(path: Path, graphs: bool) -> ModelRunner:
    cfg = ModelConfig(dtype="bfloat16", cuda_graphs=graphs, cuda_graph_max_batch_size=8)
    return ModelRunner(cfg, KVConfig(tokens_per_block=BS, num_blocks=128), path, "cuda")


def test_bf16_logits_match_transformers(checkpoint: Path) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda()
    runner = runner_for(checkpoint, graphs=False)
    logits = all_position_logits(runner, prompts(), "cuda")
    agree, total = 0, 0
    with torch.no_grad():
        for p, ours in zip(prompts(), logits, strict=True):
            ref = hf(torch.tensor([p], device="cuda")).logits[0].float()
            err = (ours - ref).norm() / ref.norm()
            assert err < 3e-2, f"relative error {err:.3e} for a prompt of {len(p)} tokens"
            agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
            total += len(p)
    assert agree / total > 0.9


def greedy(runner: ModelRunner, executor: PlanExecutor, steps: int) -> list[list[int]]:
    prompt_list = prompts()
    blocks_per_seq = math.ceil((max(PROMPT_LENGTHS) + steps) / BS)
    outputs: list[list[int]] = [[] for _ in prompt_list]
    for i, p in enumerate(prompt_list):  # prefill one request per plan
        blocks = list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
        seq = NewSequence(
            request_id=str(i),
            prompt_token_ids=p,
            sampling=SamplingParams(max_tokens=steps),
            num_cached_tokens=0,
            block_ids=blocks,
        )
        res = executor.execute(
            StepPlan(iteration=i, new=[seq], steps=[SequenceStep(str(i), len(p))])
        )
        outputs[i].append(res.sampled[0].token_id)
    for it in range(steps - 1):  # pure decode batches: the CUDA graph path
        plan = StepPlan(
            iteration=100 + it, steps=[SequenceStep(str(i), 1) for i in range(len(prompt_list))]
        )
        for s in executor.execute(plan).sampled:
            outputs[int(s.request_id)].append(s.token_id)
    return outputs


def test_cuda_graph_replay_gives_the_same_tokens_as_eager(checkpoint: Path) -> None:
    eager_runner = runner_for(checkpoint, graphs=False)
    eager = greedy(eager_runner, PlanExecutor(eager_runner), 32)
    graph_runner = runner_for(checkpoint, graphs=True)
    stream = torch.cuda.Stream()
    executor = PlanExecutor(graph_runner, graph_stream=stream)
    assert graph_runner.graphs is not None and graph_runner.graphs.batch_sizes == [1, 2, 4, 8]
    assert greedy(graph_runner, executor, 32) == eager
    # direct check on one padded decode batch (3 rows through the 4-row graph)
    chunks = [SequenceChunk([9], 40 + i, list(range(1, 5))) for i in range(3)]
    batch = graph_runner.build_batch(chunks)
    assert graph_runner.graphs.can_run(batch)
    torch.testing.assert_close(
        graph_runner.forward(batch),
        graph_runner.forward(batch, graphs="none"),
        atol=2e-2,
        rtol=2e-2,
    )


def test_prefill_graph_replay_matches_eager(checkpoint: Path) -> None:
    """Prefill graphs (the SM-disaggregation context engine): a replay gives what the same
    padded forward gives eagerly, and the plain eager forward's logits and KV (another
    attention kernel for one-token rows, so bf16 tolerance), batch after batch."""
    eager_runner = runner_for(checkpoint, graphs=False)
    eager = greedy(eager_runner, PlanExecutor(eager_runner, graphs="none"), 1)
    runner = runner_for(checkpoint, graphs=True)
    stream = torch.cuda.Stream()
    sizes = runner.capture_prefill_graphs(stream, max_num_tokens=320, max_requests=4)
    assert sizes == [64, 128, 256, 320]
    executor = PlanExecutor(runner, graphs="prefill")
    with torch.cuda.stream(stream):
        assert greedy(runner, executor, 1) == eager  # first tokens: the same kernels
    graphs = runner.prefill_graphs
    # decode-like rows, then chunks with cached prefixes: 64- and 256-token graphs
    for chunks in (
        [SequenceChunk([9], 40 + i, list(range(1, 5))) for i in range(3)],
        [SequenceChunk(list(range(3, 40)), 0, [1, 2, 3])],
        [
            SequenceChunk(list(range(3, 100)), 0, [10, 11, 12, 13, 14, 15, 16]),
            SequenceChunk(list(range(50, 80)), 37, [1, 2, 3, 4, 5]),  # positions 37-66
            SequenceChunk([7], 67, [1, 2, 3, 4, 5]),  # reads 66 written in the same batch
        ],
    ):
        with torch.cuda.stream(stream):  # the batch's copies too: one stream orders it all
            batch = runner.build_batch(chunks)
            assert graphs.can_run(batch)
            pool = runner.kv_pool.clone()
            got = runner.forward(batch, graphs="prefill").clone()
            graph_pool = runner.kv_pool.clone()
            runner.kv_pool.copy_(pool)
            padded = graphs.padded_forward(batch).clone()
            runner.kv_pool.copy_(pool)
            # the same attention kernel, launched per batch (one-token rows would take the
            # decode kernel eagerly: other bf16 rounding, checked below by relative error)
            want = runner.model.forward(dataclasses.replace(batch, decode_only=False), pool)
            runner.kv_pool.copy_(pool)
            plain = runner.forward(batch, graphs="none")
        torch.cuda.synchronize()
        torch.testing.assert_close(got, padded, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(graph_pool[1:], pool[1:], atol=2e-2, rtol=2e-2)
        err = float((got - plain).norm() / plain.norm())
        assert err < 3e-2, f"relative error {err:.3e} against the eager forward"


def greedy_plans(steps: int) -> list[StepPlan]:
    """Every prompt prefilled in one plan, then ``steps - 1`` decode plans of all of them."""
    prompt_list = prompts()
    per_seq = math.ceil((max(PROMPT_LENGTHS) + steps) / BS)
    new = [
        NewSequence(
            request_id=str(i),
            prompt_token_ids=p,
            sampling=SamplingParams(max_tokens=steps),
            num_cached_tokens=0,
            block_ids=list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)),
        )
        for i, p in enumerate(prompt_list)
    ]
    plans = [
        StepPlan(
            iteration=0,
            new=new,
            steps=[SequenceStep(str(i), len(p)) for i, p in enumerate(prompt_list)],
        )
    ]
    for it in range(1, steps):
        plans.append(
            StepPlan(iteration=it, steps=[SequenceStep(str(i), 1) for i in range(len(prompt_list))])
        )
    return plans


def test_overlapped_steps_give_the_tokens_of_plain_steps(checkpoint: Path) -> None:
    """Each plan launched before the previous one's tokens are read (decode inputs taken
    from the device, argmax inside the decode graph): the same greedy tokens as plain steps
    on the eager path."""
    eager_runner = runner_for(checkpoint, graphs=False)
    plain_ex = PlanExecutor(eager_runner)
    want = [plain_ex.execute(p).sampled for p in greedy_plans(24)]
    runner = runner_for(checkpoint, graphs=True)
    ex = PlanExecutor(runner)
    got, previous = [], None
    for plan in greedy_plans(24):
        launched = ex.launch(plan)
        if previous is not None:
            got.append(ex.finish(previous).sampled)
        previous = launched
    got.append(ex.finish(previous).sampled)
    assert got == want
