"""SM split rounding (exhaustive against a brute-force oracle) and green-context partitions."""

from __future__ import annotations

import pytest
import torch

from greenroom.kernels.sm_partition import choose_sm_split, create_sm_partitions

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _record_sm(out_ptr, n, BLOCK: tl.constexpr):
        """Each element gets the id of the SM its program ran on."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        sm = tl.inline_asm_elementwise(
            "mov.u32 $0, %smid;", "=r,r", [offs], dtype=tl.int32, is_pure=False, pack=1
        )
        tl.store(out_ptr + offs, sm, mask=offs < n)


def oracle(total: int, percent: float, granularity: int, min_sms: int) -> tuple[int, int] | None:
    """Try every context size; keep the allowed ones; closest to the target, smaller on ties."""
    target = percent * total
    for least in (min_sms, 1):
        allowed = [
            c
            for c in range(total + 1)
            if c % granularity == 0 and c >= least and total - c >= least
        ]
        if allowed:
            best = min(allowed, key=lambda c: (abs(c - target), c))
            return best, total - best
    return None


PERCENTS = [p / 100 for p in range(1, 100)]


@pytest.mark.parametrize("total", range(16, 145))
def test_hopper_split_matches_oracle_for_every_percent(total):
    for percent in PERCENTS:
        got = choose_sm_split(total, percent)
        assert got == oracle(total, percent, 8, 8), (total, percent)
        context, generation = got
        assert context % 8 == 0 and context >= 8 and generation >= 8
        assert context + generation == total


@pytest.mark.parametrize("granularity", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("min_sms", [0, 1, 4, 8, 20])
def test_other_rules_match_oracle(granularity, min_sms):
    for total in range(1, 50):
        for percent in (0.0, 0.01, 0.25, 0.5, 0.73, 0.99, 1.0):
            expected = oracle(total, percent, granularity, min_sms)
            if expected is None:
                with pytest.raises(ValueError):
                    choose_sm_split(total, percent, granularity, min_sms)
            else:
                assert choose_sm_split(total, percent, granularity, min_sms) == expected


def test_design_example_and_ties():
    assert choose_sm_split(132, 0.73) == (96, 36)  # 96.4 -> 96
    assert choose_sm_split(132, 68 / 132) == (64, 68)  # 68 is equidistant from 64 and 72
    assert choose_sm_split(132, 0.01) == (8, 124)  # never below the minimum
    assert choose_sm_split(132, 0.99) == (120, 12)  # 128 would leave only 4


@pytest.mark.parametrize("bad", [dict(total_sms=0), dict(context_percent=1.5), dict(granularity=0)])
def test_invalid_arguments(bad):
    args = dict(total_sms=132, context_percent=0.5, granularity=8) | bad
    with pytest.raises(ValueError):
        choose_sm_split(**args)


def test_partitions_need_a_cuda_device():
    with pytest.raises(RuntimeError, match="CUDA device"):
        create_sm_partitions(8, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_partitions_are_disjoint_and_run_kernels():
    pytest.importorskip("cuda.bindings")
    assert triton is not None
    total = torch.cuda.get_device_properties(0).multi_processor_count
    context, _ = choose_sm_split(total, 0.73)
    ctx_stream, gen_stream, info = create_sm_partitions(context, 0)
    try:
        assert info.context_sms >= context and info.context_sms % 8 == 0
        assert info.generation_sms > 0
        assert info.context_sms + info.generation_sms <= total == info.total_sms
        seen = {}
        for name, stream in (("context", ctx_stream), ("generation", gen_stream)):
            n = 64 * 1024 * 128
            out = torch.full((n,), -1, dtype=torch.int32, device="cuda")
            with torch.cuda.stream(stream):
                _record_sm[(n // 128,)](out, n, BLOCK=128)
            stream.synchronize()
            assert (out >= 0).all()
            seen[name] = set(out.unique().tolist())
        assert 0 < len(seen["context"]) <= info.context_sms
        assert 0 < len(seen["generation"]) <= info.generation_sms
        assert not seen["context"] & seen["generation"]
    finally:
        torch.cuda.synchronize()
        info.destroy()
