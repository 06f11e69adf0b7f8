"""Run a greedy mixed-batch serving loop on N tensor-parallel CPU ranks (gloo), for tests.

``serve_on_ranks(dirs, tp)`` starts ``tp`` spawned processes that join one gloo world through
a TCPStore of the calling process, load their weight slices of every checkpoint in ``dirs``
and drive the same plans through a PlanExecutor; rank 0's tokens come back per checkpoint.
The plans exercise chunked prefill (a small token budget, decodes beside prefill chunks) and
prefix reuse (a request whose first blocks were computed by an earlier one).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from datetime import timedelta
from pathlib import Path

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig

TOKENS_PER_BLOCK = 4
NEW_TOKENS = 10
TOKEN_BUDGET = 7
REUSED_TOKENS = 8  # request 2 starts with request 0's first two blocks


def request_prompts(vocab: int) -> list[list[int]]:
    from tiny_checkpoints import random_prompts

    p0, p1, tail = random_prompts((13, 29, 7), vocab, seed=11)
    return [p0, p1, p0[:REUSED_TOKENS] + tail]


def serve_greedy(runner, prompts: list[list[int]], executor=None) -> list[list[int]]:
    """Requests 0 and 1 arrive at once, request 2 (sharing request 0's first blocks) once
    request 0 decodes; decodes first, then prefill chunks under TOKEN_BUDGET. ``executor``:
    what runs the plans (a PlanExecutor over ``runner`` by default)."""
    from greenroom.models import PlanExecutor

    executor = executor or PlanExecutor(runner)
    bs = runner.tokens_per_block
    free = list(range(runner.num_blocks - 1, 0, -1))
    n = len(prompts)
    computed, blocks = [0] * n, [[] for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    admitted, finished, iteration = 2, [], 0
    while any(len(o) < NEW_TOKENS for o in outputs):
        if admitted == 2 and outputs[0]:
            admitted = 3
            computed[2] = REUSED_TOKENS
            blocks[2] = blocks[0][: REUSED_TOKENS // bs]
        new, steps, budget = [], [], TOKEN_BUDGET
        active = [i for i in range(admitted) if len(outputs[i]) < NEW_TOKENS]
        decodes = [i for i in active if computed[i] >= len(prompts[i])]
        for i in decodes + [i for i in active if i not in decodes]:
            todo = min(len(prompts[i]) + len(outputs[i]) - computed[i], budget)
            if todo <= 0:
                continue
            budget -= todo
            grow = [
                free.pop() for _ in range(math.ceil((computed[i] + todo) / bs) - len(blocks[i]))
            ]
            if not any(s.request_id == f"r{i}" for s in steps) and _unseen(i, iteration, executor):
                blocks[i] = blocks[i] + grow
                new.append(
                    NewSequence(
                        request_id=f"r{i}",
                        prompt_token_ids=prompts[i],
                        sampling=SamplingParams(max_tokens=NEW_TOKENS),
                        num_cached_tokens=computed[i],
                        block_ids=blocks[i],
                    )
                )
                steps.append(SequenceStep(f"r{i}", todo))
            else:
                blocks[i] += grow
                steps.append(SequenceStep(f"r{i}", todo, grow))
            computed[i] += todo
        result = executor.execute(
            StepPlan(iteration=iteration, new=new, steps=steps, finished=finished)
        )
        finished = []
        for s in result.sampled:
            i = int(s.request_id[1:])
            outputs[i].append(s.token_id)
            if len(outputs[i]) == NEW_TOKENS:
                finished.append(s.request_id)
        iteration += 1
    return outputs


def _unseen(i: int, iteration: int, executor) -> bool:
    return f"r{i}" not in executor.sequences


def make_runner(model_dir: Path, tp=None):
    from greenroom.models import ModelRunner

    kv = KVConfig(tokens_per_block=TOKENS_PER_BLOCK, num_blocks=128)
    return ModelRunner(ModelConfig(dtype="float32"), kv, model_dir, "cpu", tp=tp)


def _rank_main(rank: int, tp: int, port: int, dirs: list[str], out) -> None:
    import torch

    from greenroom.parallel.groups import init_rank_groups
    from greenroom.parallel.layout import RankLayout

    torch.set_num_threads(1)
    groups = init_rank_groups(
        RankLayout(tp_size=tp),
        rank,
        "127.0.0.1",
        port,
        epoch=1,
        device=torch.device("cpu"),
        timeout_s=60,
    )
    results = {}
    for d in dirs:
        runner = make_runner(Path(d), groups.tp)
        results[d] = serve_greedy(runner, request_prompts(runner.vocab_size))
    out.put((rank, results))
    groups.destroy()


def serve_on_ranks(dirs: list[Path], tp: int, timeout_s: float = 120.0) -> list[dict]:
    """Every rank's ``{checkpoint dir: outputs}``, in rank order."""
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, tp, store.port, [str(d) for d in dirs], out))
        for r in range(tp)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [{Path(k): v for k, v in got[r].items()} for r in range(tp)]
