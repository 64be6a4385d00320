"""PNG plots for the report (matplotlib, Agg backend; no display needed).

``plot_tradeoff``: latency and accuracy against the fraction of FLOPs kept, one point per
candidate (missing latency or accuracy values are skipped, not plotted as zero).
``plot_layer_widths``: kept vs total channels per layer (or group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_tradeoff(candidates: Sequence[Mapping], path: str | Path, title: str = "Latency and accuracy vs FLOPs kept"
                  ) -> Path:
    """Latency (left axis) and accuracy (right axis) vs ``flops_ratio`` for ``{flops_ratio, latency_ms, accuracy}``.

    The last candidate is highlighted as the chosen one. Candidates without a FLOPs ratio are skipped;
    an empty list still writes a PNG that says "no candidates".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        rows = [(_num(c.get("flops_ratio")), _num(c.get("latency_ms")), _num(c.get("accuracy")))
                for c in candidates]
        rows = [r for r in rows if r[0] is not None]
        ax.set_xlabel("FLOPs kept (fraction of the original)")
        ax.set_title(title)
        lat = sorted((f, t) for f, t, _ in rows if t is not None)
        acc = sorted((f, a) for f, _, a in rows if a is not None)
        handles = []
        if lat:
            handles += ax.plot([f for f, _ in lat], [t for _, t in lat], "o-", color="tab:blue", label="latency (ms)")
            ax.set_ylabel("latency (ms)", color="tab:blue")
        else:
            ax.set_ylabel("latency (ms): not measured")
        if acc:
            ax2 = ax.twinx()
            handles += ax2.plot([f for f, _ in acc], [a for _, a in acc], "s--", color="tab:orange",
                                label="accuracy")
            ax2.set_ylabel("accuracy", color="tab:orange")
            last = rows[-1]
            if last[2] is not None:
                ax2.plot([last[0]], [last[2]], "*", color="tab:red", markersize=14)
        if rows and rows[-1][1] is not None:
            handles += ax.plot([rows[-1][0]], [rows[-1][1]], "*", color="tab:red", markersize=14, label="chosen")
        if not rows:
            ax.text(0.5, 0.5, "no candidates", ha="center", va="center", transform=ax.transAxes)
        if handles:
            ax.legend(handles=handles, loc="best", fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def plot_layer_widths(layers: Mapping[str, tuple[int, int]], path: str | Path,
                      title: str = "Channels kept per layer") -> Path:
    """Bar chart of kept (dark) over total (light) channels for ``{layer_name: (kept, total)}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(layers)
    kept = [float(layers[n][0]) for n in names]
    total = [float(layers[n][1]) for n in names]
    width = max(6.4, min(40.0, 0.3 * len(names) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=100)
    try:
        x = list(range(len(names)))
        ax.bar(x, total, color="lightgray", label="total")
        ax.bar(x, kept, color="tab:green", label="kept")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=max(4, 9 - len(names) // 20))
        ax.set_ylabel("channels")
        ax.set_title(title)
        if not names:
            ax.text(0.5, 0.5, "no layers", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


__all__ = ["plot_layer_widths", "plot_tradeoff"]
