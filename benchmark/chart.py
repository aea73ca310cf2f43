#!/usr/bin/env python3
"""Bar chart of the candela ÷ peer ratios of one results JSON, next to it as .png.

    benchmark/.venv/bin/python benchmark/chart.py benchmark/results/single.json

One horizontal bar per (pair, metric): the median ratio over the runs, whiskers
from min to max, log scale centred on 1. Green: candela better (ratio above 1
where higher is better, below 1 where lower is better); red: the peer better;
grey: within 3%.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str) -> None:
    r = json.loads(Path(path).read_text())
    metrics = [m for m in r["metrics"] if not (r["workload"] == "serving" and "P99" in m["key"])]
    bars = []  # (label, median, lo, hi, better)
    for pair in r["ratios"]:
        group = f'{pair["candela"]}  ÷  {pair["peer"]}'
        first = True
        for m in metrics:
            s = pair["metrics"].get(m["key"])
            if not s or not s["median"]:
                continue
            bars.append((group if first else None, f'{m["label"]}  ({m["better"]} is better)', s["median"], s["min"], s["max"], m["better"]))
            first = False
    if not bars:
        print(f"chart: no ratios in {path}")
        return
    groups = sum(1 for b in bars if b[0])
    height = 1.2 + 0.32 * len(bars) + 0.35 * groups
    fig, ax = plt.subplots(figsize=(11, height))
    y, ys, labels = 0.0, [], []
    for group, label, med, lo, hi, better in bars:
        if group:
            y += 0.6
            ax.text(0.0, y - 0.05, group, transform=ax.get_yaxis_transform(), ha="left", va="bottom",
                    fontsize=9, fontweight="bold")
            y += 0.45
        good = med > 1 if better == "higher" else med < 1
        color = "#9e9e9e" if abs(med - 1) < 0.03 else ("#2e7d32" if good else "#c62828")
        ax.barh(y, med - 1, left=1, height=0.7, color=color, alpha=0.85)
        ax.errorbar(med, y, xerr=[[med - lo], [hi - med]], fmt="none", ecolor="black", capsize=3, lw=1)
        txt = f"{med:.2f}×" if lo == hi else f"{med:.2f}× ({lo:.2f}–{hi:.2f})"
        ax.text(max(hi, med, 1) * 1.04, y, txt, va="center", fontsize=8)
        ys.append(y)
        labels.append(label)
        y += 1.0
    ax.set_xscale("log")
    vals = [v for b in bars for v in b[2:5]]
    lo_x, hi_x = min(vals + [1]) / 1.6, max(vals + [1]) * 2.2
    ax.set_xlim(lo_x, hi_x)
    ax.axvline(1, color="black", lw=1)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_ylim(y, -0.2)
    ax.set_xlabel("ratio candela ÷ peer (log scale; green = candela better, red = peer better)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    m = r["machine"]
    ax.set_title(
        f'{r["workload"]}{" (quick)" if r.get("quick") else ""}: median of {r["runs"]} run(s), whiskers min–max\n'
        f'{m["cpuModel"]}, {m["cores"]} cores, {r["threads"]} threads, {r["device"]} · candela {m["commit"][:9] if m.get("commit") else "?"} · {m["date"][:10]}',
        fontsize=10,
    )
    ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
