"""SM-level disaggregation against mixed chunked prefill: load points, Pareto curves, targets.

A serving mode is mixed chunked prefill (``sm_percent`` None) or SM disaggregation with a
context-engine share of the SMs and a routing policy (``fixed``: every prompt on the context
engine; ``adaptive``: short prompts ride in the generation step). Each mode runs the same
request sets (mixes) at several Poisson loads; a point is (output tokens/s per GPU, tokens/s
per user = 1000 / mean TPOT ms, TTFT p50/p99). The comparison interpolates the mixed curve of
the same mix at an SM point's throughput, so both are read at equal tokens/s per GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from greenroom.replay import ReplayReport

TARGET_USER_SPEEDUP = 1.3
TARGET_MAX_TTFT_P99_RATIO = 1.5

# Adaptive routing against mixed, per mix (issue 16): tokens/s per user at equal tokens/s per
# GPU with TTFT p99 <= 1.0x mixed; "every": at every comparable load (it never loses),
# "best": at one load at least.
ADAPTIVE_TARGETS: dict[str, tuple[str, float]] = {
    "openorca": ("every", 0.97),
    "decode_heavy": ("every", 0.97),
    "long_context": ("best", 1.25),
    "prefill_heavy": ("best", 1.2),
    "balanced": ("best", 1.2),
}
ADAPTIVE_MAX_TTFT_P99_RATIO = 1.0
POLICIES = ("fixed", "adaptive")


@dataclass(frozen=True)
class Mode:
    name: str
    sm_percent: float | None  # None: mixed chunked prefill
    policy: str = "fixed"  # SM modes: sm_disagg.policy
    threshold: int = 0  # adaptive: sm_disagg.routing_threshold_tokens (0: the run's setting)
    # adaptive: sm_disagg.ride_when_generation_idle for this mode (None: the run's setting)
    ride_when_idle: bool | None = None
    context_tokens: int = 0  # sm_disagg.context_max_num_tokens (0: the run's setting)

    @classmethod
    def mixed(cls) -> Mode:
        return cls("mixed", None)

    @classmethod
    def sm(
        cls,
        percent: float,
        policy: str = "fixed",
        threshold: int = 0,
        ride_when_idle: bool | None = None,
        context_tokens: int = 0,
    ) -> Mode:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is invalid: one of {POLICIES}")
        if threshold < 0 or (threshold and policy != "adaptive"):
            raise ValueError(f"threshold {threshold} is invalid: a positive one, for adaptive")
        if ride_when_idle and policy != "adaptive":
            raise ValueError("riding while the generation flow is idle needs policy adaptive")
        if not 0.0 < percent < 1.0 or context_tokens < 0:
            raise ValueError(f"share {percent} or context budget {context_tokens} is invalid")
        name = f"{policy}{round(percent * 100)}"
        name += f"_t{threshold}" if threshold else ""
        name += {True: "_idle", False: "_noidle", None: ""}[ride_when_idle]
        name += f"_ctx{context_tokens}" if context_tokens else ""
        return cls(name, percent, policy, threshold, ride_when_idle, context_tokens)


MODE_GRAMMAR = (
    "mixed, or fixed|adaptive with options: adaptive:N (routing threshold N tokens), "
    "+share=F (this mode's context SM share, else each of --sm-percents), +idle or +noidle "
    "(prompts ride while the generation flow is idle, or not), +ctx=N (context plan token "
    "budget); e.g. adaptive+noidle, adaptive:1024+share=0.7"
)


def parse_modes(names: str, sm_percents: str) -> list[Mode]:
    """``"mixed,fixed,adaptive,adaptive:512"`` with ``"0.3"`` -> mixed, fixed30, adaptive30,
    adaptive30_t512 (``:N``: that mode's routing_threshold_tokens, e.g. to sweep thresholds);
    ``+share=F``, ``+idle``/``+noidle`` and ``+ctx=N`` set one mode's context share, idle riding and
    context token budget (see ``MODE_GRAMMAR``)."""
    modes = []
    for spec in (n.strip() for n in names.split(",") if n.strip()):
        head, *options = spec.split("+")
        name, _, threshold = head.partition(":")
        if name == "mixed" and not threshold and not options:
            modes.append(Mode.mixed())
            continue
        if name not in POLICIES or (threshold and not threshold.isdigit()):
            raise ValueError(f"mode {spec!r} is invalid: {MODE_GRAMMAR}")
        shares, idle, ctx = [float(p) for p in sm_percents.split(",")], None, 0
        for opt in options:
            key, _, value = opt.partition("=")
            try:
                if key in ("idle", "noidle") and not value:
                    idle = key == "idle"
                elif key == "share":
                    shares = [float(value)]
                elif key == "ctx":
                    ctx = int(value)
                else:
                    raise ValueError(opt)
            except ValueError:
                raise ValueError(f"mode {spec!r} is invalid: {MODE_GRAMMAR}") from None
        n = int(threshold or 0)
        modes += [Mode.sm(p, name, n, idle, ctx) for p in shares]
    if not modes:
        raise ValueError("no mode to run: give --modes, e.g. mixed,fixed,adaptive")
    return modes


def node_overrides(mode: Mode, base: dict) -> dict:
    """Config overrides of one mode: ``base`` (model, pool, budgets) plus the SM switch."""
    out = dict(base)
    out["sm_disagg.enabled"] = mode.sm_percent is not None
    if mode.sm_percent is not None:
        out["sm_disagg.context_sm_percent"] = mode.sm_percent
        out["sm_disagg.policy"] = mode.policy
        if mode.threshold:
            out["sm_disagg.routing_threshold_tokens"] = mode.threshold
        if mode.ride_when_idle is not None:
            out["sm_disagg.ride_when_generation_idle"] = mode.ride_when_idle
        if mode.context_tokens:
            out["sm_disagg.context_max_num_tokens"] = mode.context_tokens
    return out


@dataclass(frozen=True)
class Point:
    mode: str
    mix: str
    rate: float  # offered requests/s (Poisson)
    num_requests: int
    num_failed: int
    duration_s: float
    output_tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float | None  # 1000 / mean TPOT ms
    tpot_mean_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p99_ms: float | None
    # every request's TTFT (ms), for the p99 ratio's bootstrap interval
    ttfts_ms: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def point_from_report(
    mode: str, mix: str, rate: float, report: ReplayReport, num_gpus: int = 1
) -> Point:
    tpot = report.tpot_ms.mean
    return Point(
        mode=mode,
        mix=mix,
        rate=rate,
        num_requests=report.num_sent,
        num_failed=report.num_failed,
        duration_s=round(report.duration_s, 3),
        output_tokens_per_s_per_gpu=report.output_throughput / num_gpus,
        tokens_per_s_per_user=1000.0 / tpot if tpot else None,
        tpot_mean_ms=tpot,
        ttft_p50_ms=report.ttft_ms.p50,
        ttft_p99_ms=report.ttft_ms.p99,
        itl_p99_ms=report.itl_ms.p99,
        ttfts_ms=tuple(round(r.ttft_s * 1e3, 3) for r in report.records if r.ttft_s is not None),
    )


def ttft_p99_ratio_interval(
    sm_ms: Sequence[float],
    mixed_ms: Sequence[float],
    level: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A bootstrap interval of TTFT p99 (SM) over TTFT p99 (mixed): both request sets
    resampled with replacement, the ratio's central ``level`` share. With a few hundred
    requests a p99 is the second or third worst of them, so two runs of one mode differ by
    more than a small ratio; an interval that holds 1.0 cannot tell the modes apart. None
    with fewer than 20 requests on either side."""
    import numpy as np

    if min(len(sm_ms), len(mixed_ms)) < 20:
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(sm_ms, dtype=np.float64), np.asarray(mixed_ms, dtype=np.float64)
    ra = np.percentile(a[rng.integers(0, len(a), (resamples, len(a)))], 99, axis=1)
    rb = np.percentile(b[rng.integers(0, len(b), (resamples, len(b)))], 99, axis=1)
    ratios = ra / np.maximum(rb, 1e-9)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return round(float(lo), 3), round(float(hi), 3)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both tokens/s per GPU and tokens/s per user, sorted by
    throughput."""
    pts = [p for p in points if p.tokens_per_s_per_user is not None]
    front = []
    for p in pts:
        dominated = any(
            q is not p
            and q.output_tokens_per_s_per_gpu >= p.output_tokens_per_s_per_gpu
            and q.tokens_per_s_per_user >= p.tokens_per_s_per_user
            and (
                q.output_tokens_per_s_per_gpu > p.output_tokens_per_s_per_gpu
                or q.tokens_per_s_per_user > p.tokens_per_s_per_user
            )
            for q in pts
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.output_tokens_per_s_per_gpu)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Piecewise-linear y at x over points sorted by x; None outside [min x, max x]."""
    pairs = sorted(zip(xs, ys, strict=True))
    if not pairs or not pairs[0][0] <= x <= pairs[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pairs[0][1]


def compare_at_equal_throughput(
    mixed: Sequence[Point],
    sm: Sequence[Point],
    min_speedup: float = TARGET_USER_SPEEDUP,
    max_ttft_ratio: float = TARGET_MAX_TTFT_P99_RATIO,
    equal_load_fallback: bool = False,
) -> list[dict]:
    """Per SM point: the mixed curve read at the same tokens/s per GPU (linear between mixed
    load points), the user-speed ratio and the TTFT p99 ratio; None where the SM point's
    throughput lies outside the mixed curve's range, unless ``equal_load_fallback``: then
    the mixed point at the same offered load stands in (``compared_at`` says which)."""
    curve = [p for p in mixed if p.tokens_per_s_per_user is not None and p.ttft_p99_ms]
    xs = [p.output_tokens_per_s_per_gpu for p in curve]
    out = []
    for p in sm:
        x = p.output_tokens_per_s_per_gpu
        user = interpolate(xs, [q.tokens_per_s_per_user for q in curve], x)
        ttft = interpolate(xs, [q.ttft_p99_ms for q in curve], x)
        at = "equal_throughput"
        same_load = next((q for q in curve if q.rate == p.rate), None)
        if user is None and equal_load_fallback and same_load is not None:
            user, ttft, at = same_load.tokens_per_s_per_user, same_load.ttft_p99_ms, "equal_load"
        speedup = p.tokens_per_s_per_user / user if user and p.tokens_per_s_per_user else None
        ttft_ratio = p.ttft_p99_ms / ttft if ttft and p.ttft_p99_ms else None
        # the interval reads the mixed point at the same load (an interpolated p99 has no
        # requests of its own)
        interval = ttft_p99_ratio_interval(p.ttfts_ms, same_load.ttfts_ms) if same_load else None
        out.append(
            {
                "mode": p.mode,
                "mix": p.mix,
                "rate": p.rate,
                "compared_at": at if user is not None else None,
                "tokens_per_s_per_gpu": x,
                "sm_tokens_per_s_per_user": p.tokens_per_s_per_user,
                "mixed_tokens_per_s_per_user": user,
                "user_speedup": finite(speedup),
                "sm_ttft_p99_ms": p.ttft_p99_ms,
                "mixed_ttft_p99_ms": ttft,
                "ttft_p99_ratio": finite(ttft_ratio),
                "ttft_p99_ratio_interval90": list(interval) if interval else None,
                "meets_target": speedup is not None
                and ttft_ratio is not None
                and speedup >= min_speedup
                and ttft_ratio <= max_ttft_ratio,
            }
        )
    return out


def mode_comparisons(points: Sequence[Point], mode: str, mix: str) -> list[dict]:
    """``mode``'s points of ``mix`` against the mixed curve of ``mix``, judged by that mix's
    adaptive target (a ratio of 1.0 where the mix has none)."""
    _, target = ADAPTIVE_TARGETS.get(mix, ("best", 1.0))
    return compare_at_equal_throughput(
        [p for p in points if p.mix == mix and p.mode == "mixed"],
        [p for p in points if p.mix == mix and p.mode == mode],
        min_speedup=target,
        max_ttft_ratio=ADAPTIVE_MAX_TTFT_P99_RATIO,
        equal_load_fallback=True,
    )


def adaptive_targets(points: Sequence[Point]) -> dict[str, dict]:
    """Per mix and adaptive mode: the comparison rows and whether the issue's target holds
    (``pass`` None when no adaptive point could be compared)."""
    out: dict[str, dict] = {}
    mixes = sorted({p.mix for p in points}, key=lambda m: (m not in ADAPTIVE_TARGETS, m))
    modes = sorted({p.mode for p in points if p.mode.startswith("adaptive")})
    for mix in mixes:
        rule, target = ADAPTIVE_TARGETS.get(mix, ("best", 1.0))
        for mode in modes:
            rows = mode_comparisons(points, mode, mix)
            if not rows:
                continue
            judged = [r for r in rows if r["user_speedup"] is not None]
            verdict = None
            if judged:
                hits = [r["meets_target"] for r in judged]
                verdict = all(hits) if rule == "every" else any(hits)
            speedups = [r["user_speedup"] for r in judged]
            out[f"{mix}/{mode}"] = {
                "target": f"{rule} load: >= {target}x tokens/s per user, TTFT p99 <= "
                f"{ADAPTIVE_MAX_TTFT_P99_RATIO}x mixed",
                "pass": verdict,
                "user_speedup_min": min(speedups) if speedups else None,
                "user_speedup_max": max(speedups) if speedups else None,
                "ttft_p99_ratio_max": max(
                    (r["ttft_p99_ratio"] for r in judged if r["ttft_p99_ratio"] is not None),
                    default=None,
                ),
                "rows": rows,
            }
    return out


def best_comparison(rows: Sequence[dict]) -> dict | None:
    """The comparable row with the highest user speedup among those within the TTFT bound
    (else the highest speedup overall)."""
    rows = [r for r in rows if r["user_speedup"] is not None]
    if not rows:
        return None
    ok = [
        r
        for r in rows
        if r["ttft_p99_ratio"] is not None and r["ttft_p99_ratio"] <= TARGET_MAX_TTFT_P99_RATIO
    ]
    return max(ok or rows, key=lambda r: r["user_speedup"])


def user_speed_ceiling(mixed: Point, mixed_profile: dict) -> dict | None:
    """The most SM disaggregation can give per user at a mixed point's load.

    Its generation engine only ever runs decode steps, so at best every step is as fast as
    mixed mode's own decode-only steps (whole GPU, no prefill beside it); mixed TPOT over that
    step time bounds the user-speed ratio from above. A real generation partition is slower
    (fewer SMs, prefill sharing memory bandwidth), so measured ratios sit below this.
    ``mixed_profile``: the mixed engine's step profile for the point (``StepProfile.summary``).
    """
    decode, other = mixed_profile.get("decode", {}), mixed_profile.get("other", {})
    # how often a decode-only step delivers tokens; an overlapped step's wall time also spans
    # the launch of the next one (about twice the interval), so it is the fallback only
    step_ms = decode.get("interval_ms_p50") or decode.get("wall_ms_mean")
    if not step_ms or not mixed.tokens_per_s_per_user:
        return None
    steps = decode.get("steps", 0) + other.get("steps", 0)
    return {
        "mix": mixed.mix,
        "rate": mixed.rate,
        "mixed_tpot_ms": finite(mixed.tpot_mean_ms),
        "decode_only_step_ms": step_ms,
        "prefill_step_ms": other.get("interval_ms_p50") or other.get("wall_ms_mean"),
        "steps_with_prefill_share": finite(other.get("steps", 0) / steps) if steps else None,
        "user_speedup_ceiling": finite(1000.0 / step_ms / mixed.tokens_per_s_per_user),
    }


def context_ttft_floor(sm: Point, context_profile: dict, prompts: int, mixed: Point) -> dict | None:
    """What the context engine's speed alone does to TTFT at an SM point.

    A prompt's first token waits at least for the context steps that carry it; each step
    carries one prompt or more, so the mean TTFT of the prompts it prefilled is at least its
    busy time over their count (``floor_ms``), and TTFT p99 is at least the mean. A floor
    above mixed mode's TTFT p99 (``floor_over_mixed_p99`` > 1) puts TTFT p99 <= 1.0x out of
    reach at that SM share whatever the routing or the queueing; the rest of the gap up to
    the measured p99 is queueing behind other prompts. ``prompts``: prompts the context engine
    took at the point (handoffs)."""
    other = context_profile.get("other", {})
    busy_s = other.get("wall_s_total")
    if not prompts or not busy_s or not mixed.ttft_p99_ms:
        return None
    floor_ms = busy_s * 1e3 / prompts
    return {
        "mix": sm.mix,
        "rate": sm.rate,
        "mode": sm.mode,
        "context_prompts": prompts,
        "context_steps": other.get("steps", 0),
        "floor_ms": finite(floor_ms),
        "ttft_p99_ms": finite(sm.ttft_p99_ms),
        "mixed_ttft_p99_ms": finite(mixed.ttft_p99_ms),
        "floor_over_mixed_p99": finite(floor_ms / mixed.ttft_p99_ms),
    }


def plot_pareto(points: Sequence[Point], path: str, title: str) -> None:
    """tokens/s per GPU against tokens/s per user, one line per mode (its Pareto front), the
    SM modes' joint front drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    modes = sorted({p.mode for p in points}, key=lambda m: (m != "mixed", m))
    for mode in modes:
        pts = sorted(
            (p for p in points if p.mode == mode and p.tokens_per_s_per_user),
            key=lambda p: p.tokens_per_s_per_user,
        )
        style = {"color": "black", "linewidth": 2.5} if mode == "mixed" else {"alpha": 0.6}
        ax.plot(
            [p.tokens_per_s_per_user for p in pts],
            [p.output_tokens_per_s_per_gpu for p in pts],
            marker="o",
            label="mixed chunked prefill" if mode == "mixed" else f"SM disagg, {mode}",
            **style,
        )
    front = pareto_front([p for p in points if p.mode != "mixed"])
    if front:
        ax.plot(
            [p.tokens_per_s_per_user for p in front],
            [p.output_tokens_per_s_per_gpu for p in front],
            color="tab:red",
            linewidth=2.5,
            linestyle="--",
            label="SM disagg (best of splits)",
        )
    ax.set_xlabel("tokens/s per user (1000 / mean TPOT)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_targets(comparisons: dict[str, dict[str, list[dict]]], path: str, title: str) -> None:
    """One panel per mix: each SM point's tokens/s per user over mixed's (at equal tokens/s
    per GPU) against its TTFT p99 over mixed's, with the mix's target region shaded (at least
    the per-user target, TTFT p99 at most mixed's) and each ratio's 90% interval drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = [m for m, by_mode in comparisons.items() if any(by_mode.values())]
    if not mixes:
        return
    fig, axes = plt.subplots(1, len(mixes), figsize=(4.2 * len(mixes), 4.2), squeeze=False)
    for ax, mix in zip(axes[0], mixes, strict=True):
        _, target = ADAPTIVE_TARGETS.get(mix, ("best", TARGET_USER_SPEEDUP))
        rows = [r for rs in comparisons[mix].values() for r in rs if r["ttft_p99_ratio"]]
        xs = [r["ttft_p99_ratio"] for r in rows] + [1.0]
        xs += [x for r in rows for x in (r.get("ttft_p99_ratio_interval90") or ())]
        ys = [r["user_speedup"] for r in rows] + [1.0, target]
        lo_x, hi_x = min(xs) / 1.3, max(xs) * 1.3
        lo_y, hi_y = min(ys) - 0.05, max(ys) + 0.05
        ax.fill_between([lo_x, 1.0], target, hi_y, color="tab:green", alpha=0.12, label="target")
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        for mode in comparisons[mix]:
            pts = [r for r in comparisons[mix][mode] if r["ttft_p99_ratio"]]
            if not pts:
                continue
            line = ax.plot(
                [r["ttft_p99_ratio"] for r in pts],
                [r["user_speedup"] for r in pts],
                marker="o",
                linestyle="none",
                label=mode,
            )[0]
            for r in pts:
                if r.get("ttft_p99_ratio_interval90"):
                    a, b = r["ttft_p99_ratio_interval90"]
                    ax.plot([a, b], [r["user_speedup"]] * 2, color=line.get_color(), alpha=0.5)
                ax.annotate(f"{r['rate']:g}/s", (r["ttft_p99_ratio"], r["user_speedup"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(lo_x, hi_x)
        plain = matplotlib.ticker.FormatStrFormatter("%.2g")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_ylim(lo_y, hi_y)
        ax.set_title(mix, fontsize=10)
        ax.set_xlabel("TTFT p99 / mixed")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("tokens/s per user / mixed (equal tokens/s per GPU)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)
