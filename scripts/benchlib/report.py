"""Summaries of the phases, the targets, and the printed report (table, curve, PASS/MISS lines)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .streams import Phase

TARGET_OVERHEAD = 0.95     # API tok/s >= 0.95 x direct, at 1, 16 and 64 streams
OVERHEAD_STREAMS = (1, 16, 64)
TARGET_TTFT_MS = 50.0      # API TTFT <= direct TTFT + 50 ms, at 1 stream
TARGET_PEER = {1: 2.5, 16: 3.0}   # InferQL (API) tok/s >= this x the peer's
TARGET_PEER_TTFT = 0.5     # InferQL TTFT p50 <= 0.5 x the peer's, at 16 streams
TARGET_BANDWIDTH = 0.5     # weight bytes read per second at 1 stream >= 50 % of the measured read bandwidth
TARGET_AGREEMENT = 0.97    # fast path vs float32 eager reference: greedy agreement
TARGET_DLOGPROB = 0.05     # ... and mean |d logprob|


@dataclass
class Summary:
    mode: str
    concurrency: int
    tok_s: float               # median over rounds
    ttft_p50: float | None
    ttft_p95: float | None
    tokens: int                # median tokens per round
    max_batch: int             # largest decode batch seen in any round
    rounds: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(phases: list[Phase]) -> Summary:
    ttfts = [s.ttft_ms for p in phases for s in p.streams if s.ttft_ms is not None]
    per_round = [p.tok_s for p in phases]
    return Summary(
        mode=phases[0].mode,
        concurrency=phases[0].concurrency,
        tok_s=statistics.median(per_round),
        ttft_p50=percentile(ttfts, 0.50),
        ttft_p95=percentile(ttfts, 0.95),
        tokens=int(statistics.median(p.tokens for p in phases)),
        max_batch=max(p.max_batch for p in phases),
        rounds=per_round,
    )


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def ratio_of_rounds(num: Summary, den: Summary) -> tuple[float, list[float]]:
    """Median over rounds of the per-round ratio (phases of one round ran close in time)."""
    ratios = [a / b if b else 0.0 for a, b in zip(num.rounds, den.rounds)]
    return statistics.median(ratios), ratios


def report(summaries: dict[tuple[str, int], Summary], concurrency: list[int], connect_ms: list[float],
           modes: list[str], machine: dict[str, float] | None = None, engine_facts: dict | None = None,
           fidelity=None) -> None:
    print()
    print(f"{'mode':<8}{'streams':>8}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'tokens':>8}"
          f"{'max batch':>11}   tok/s per round")
    for c in concurrency:
        for mode in modes:
            s = summaries[(mode, c)]
            rounds = " ".join(f"{v:.1f}" for v in s.rounds)
            print(f"{mode:<8}{c:>8}{s.tok_s:>10.1f}{fmt_ms(s.ttft_p50):>10}{fmt_ms(s.ttft_p95):>10}"
                  f"{s.tokens:>8}{s.max_batch:>11}   {rounds}")
    print("(tok/s: aggregate, median over rounds; TTFT in ms over all streams of all rounds;"
          " tokens: per phase, median over rounds; max batch: largest decode batch seen)")
    if connect_ms:
        print(f"(API TTFT starts at the subscribe message; the websocket connect + connection_init before it"
              f" took p50 {percentile(connect_ms, 0.5):.1f} ms, p95 {percentile(connect_ms, 0.95):.1f} ms)")
    if len(concurrency) > 1:
        print("curve (aggregate tok/s by streams): " + "; ".join(
            f"{mode} " + " ".join(f"{c}:{summaries[(mode, c)].tok_s:.0f}" for c in concurrency) for mode in modes))

    print()
    print("Targets (ratios: median over rounds of the per-round ratio; per-round values in brackets; a round's"
          " tok/s of API and of direct: over its --pairs phases of each, run A B B A)")
    lines: list[tuple[str, str, str]] = []

    def per_round(values: list[float], unit: str = "x") -> str:
        return "[" + " ".join(f"{v:.2f}{unit}" for v in values) + "]"

    def plural(c: int) -> str:
        return f"{c} stream{'s' if c > 1 else ''}"

    for c in concurrency:
        ratio, rounds = ratio_of_rounds(summaries[("API", c)], summaries[("direct", c)])
        targeted = c in OVERHEAD_STREAMS
        goal = f"(>= {TARGET_OVERHEAD}x)" if targeted else "(no target at this concurrency)"
        lines.append((f"API/direct tok/s at {plural(c)}", f"{ratio:.3f}x {goal} {per_round(rounds)}",
                      verdict(ratio >= TARGET_OVERHEAD if targeted else None)))
    if 1 in concurrency:
        api, direct = summaries[("API", 1)], summaries[("direct", 1)]
        if api.ttft_p50 is not None and direct.ttft_p50 is not None:
            delta = api.ttft_p50 - direct.ttft_p50
            lines.append(("TTFT p50 API - direct at 1 stream",
                          f"{delta:+.1f} ms (API {api.ttft_p50:.1f} ms, direct {direct.ttft_p50:.1f} ms;"
                          f" <= +{TARGET_TTFT_MS:.0f} ms)",
                          verdict(delta <= TARGET_TTFT_MS)))
    if "peer" in modes:
        for c in concurrency:
            ratio, rounds = ratio_of_rounds(summaries[("API", c)], summaries[("peer", c)])
            goal = TARGET_PEER.get(c)
            lines.append((f"InferQL/peer tok/s at {plural(c)}",
                          f"{ratio:.2f}x {f'(>= {goal}x)' if goal else '(no target)'} {per_round(rounds)}",
                          verdict(ratio >= goal if goal else None)))
        if 16 in concurrency:
            api, peer = summaries[("API", 16)], summaries[("peer", 16)]
            if api.ttft_p50 and peer.ttft_p50:
                r = api.ttft_p50 / peer.ttft_p50
                lines.append(("TTFT p50 InferQL/peer at 16 streams",
                              f"{r:.2f}x (InferQL {api.ttft_p50:.0f} ms, peer {peer.ttft_p50:.0f} ms;"
                              f" <= {TARGET_PEER_TTFT}x)", verdict(r <= TARGET_PEER_TTFT)))
    top = max(concurrency)
    if top >= 64:
        got = summaries[("API", top)]
        lines.append((f"{plural(top)} served through the API",
                      f"every stream completed; up to {got.max_batch} decoded together",
                      verdict(got.max_batch >= 64)))
    if machine and engine_facts:
        bw = machine["bandwidth_gbs"]
        if 1 in concurrency:
            rate = summaries[("direct", 1)].tok_s * engine_facts["weight_bytes"] / 1e9
            lines.append(("weights read at 1 stream / read bandwidth",
                          f"{rate / bw:.0%} ({engine_facts['weight_bytes'] / 1e6:.0f} MB per token x"
                          f" {summaries[('direct', 1)].tok_s:.1f} tok/s = {rate:.1f} GB/s of {bw:.1f};"
                          f" >= {TARGET_BANDWIDTH:.0%})", verdict(rate / bw >= TARGET_BANDWIDTH)))
        at = 16 if 16 in concurrency else top
        gemm = machine[f"gemm_{engine_facts['dtype']}_gflops"]
        flops = summaries[("direct", at)].tok_s * 2 * engine_facts["macs"] / 1e9
        lines.append((f"achieved FLOP/s at {plural(at)} / GEMM rate",
                      f"{flops / gemm:.0%} ({flops:.0f} of {gemm:.0f} GFLOP/s {engine_facts['dtype']}; no target)",
                      "n/a"))
    for rows, fid in (fidelity or {}).items():
        how = "1-row steps" if rows == 1 else f"{rows}-row steps"
        lines.append((f"fidelity ({how}): greedy agreement with float32 eager",
                      f"{fid.agreement:.1%} over {fid.positions} positions (>= {TARGET_AGREEMENT:.0%})",
                      verdict(fid.agreement >= TARGET_AGREEMENT)))
        lines.append((f"fidelity ({how}): mean |d logprob| vs float32 eager",
                      f"{fid.mean_abs_dlogprob:.4f} (max {fid.max_abs_dlogprob:.3f}; <= {TARGET_DLOGPROB})",
                      verdict(fid.mean_abs_dlogprob <= TARGET_DLOGPROB)))
    width = max(len(name) for name, _, _ in lines)
    for name, value, status in lines:
        print(f"  {status:<5} {name:<{width}}  {value}")
    print("(targets are reported, never enforced: the exit status does not depend on them)")
