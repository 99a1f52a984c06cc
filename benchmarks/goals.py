"""The goals of issue 14 (the speed work) as ratios of a ``deeplabv2 bench`` run: the table of
who is measured against whom, and the ratios themselves. ``speed.py`` prints them under its
table; the package's bench knows nothing of goals."""

from __future__ import annotations

import statistics


def _per_round(numerators: list[list[float]], denominator: list[float]) -> float | None:
    """Median over the rounds of ``min(numerators at round i) / denominator[i]``: the modes
    of a size are timed round-robin, so the times of one round saw the same machine."""
    rounds = [min(column) / d for *column, d in zip(*numerators, denominator)]
    return statistics.median(rounds) if rounds else None


#: each goal: (what it compares, our modes, the modes it is measured against): the ratio is the
#: best of theirs over the best of ours, so > 1 means ours is faster
GOALS = (("FP32 ours (fast) / best peer FP32", ("fast",), ("onnxruntime", "openvino")),
         ("bf16 ours / OpenVINO bf16", ("bf16",), ("openvino-bf16",)),
         ("INT8 / our fastest other precision", ("int8",), ("fast", "bf16", "compile")))


def goal_ratios(result: dict) -> list[str]:
    """The issue's goals (:data:`GOALS`) as ratios of this run, per size: our FP32 path
    (``fast``) against the faster of ONNX Runtime and OpenVINO FP32, our bf16 against OpenVINO
    bf16, INT8 against our fastest other precision, and the bf16 training step against FP32
    NCHW. Each as the ratio of the medians and, where the rounds' times are known, the median
    of the per-round ratios (less moved by a machine whose speed drifts during the run)."""
    out = []
    for size in {tuple(r["size"]) for r in result["inference"]}:
        rows = {r["mode"]: r for r in result["inference"] if tuple(r["size"]) == size}
        t = {m: r["median_s"] for m, r in rows.items()}
        for label, ours, theirs in GOALS:
            ours, theirs = [m for m in ours if m in t], [m for m in theirs if m in t]
            if not ours or not theirs:
                continue
            line = (f"{size[0]}x{size[1]}: {label}: "
                    f"{min(t[m] for m in theirs) / min(t[m] for m in ours):.2f}x")
            mine = min(ours, key=t.get)
            if all("times_s" in rows[m] for m in (mine, *theirs)):
                per_round = _per_round([rows[m]["times_s"] for m in theirs],
                                       rows[mine]["times_s"])
                line += f" (median of per-round ratios {per_round:.2f}x)"
            out.append(line)
    for r in result["train"]:
        if r["amp"] == "bf16":
            out.append(f"training step bf16 autocast + channels-last / FP32 NCHW: "
                       f"{r['speedup_vs_fp32']:.2f}x")
    return sorted(out)
