"""The charts of bench/peers.py: throughput against the number of series, and latency CDFs.

Matplotlib's object API with an Agg canvas (no pyplot state, no display), as training/evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(width: float = 9, height: float = 5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def throughput_chart(cells: dict[str, dict[int, dict]], path: Path) -> Path:
    """Observations/s (log) against K series (log), one line per system."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, by_k in cells.items():
        ks = sorted(k for k, c in by_k.items() if "error" not in c)
        if ks:
            ax.plot(ks, [by_k[k]["obs_per_s"] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("series K (one client each, ping-pong)")
    ax.set_ylabel("observations answered per second")
    ax.set_title("Throughput against the number of series (same model, same machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def latency_cdf(latencies: dict[str, list[float]], path: Path, k: int = 64) -> Path:
    """Share of observations answered within x ms (log x), one curve per system, at K series."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, lat in latencies.items():
        if not lat:
            continue
        ms = np.sort(np.asarray(lat) * 1e3)
        ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency per observation, ms")
    ax.set_ylabel("share of observations")
    ax.set_title(f"Latency CDF at K = {k} series")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
