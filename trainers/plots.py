"""Plots people would rather see than read: accuracy vs t_test, confusion matrices (matplotlib figures; the caller
saves or logs them, e.g. MlflowClient.log_figure, and closes them)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainers.zsl import ZSLCurve, ZSLMetrics  # noqa: E402


def t_curve_figure(curve: ZSLCurve, title: str = "", chosen_t: int | None = None) -> plt.Figure:
    """Top-1 (mean ± std over noise draws) against t_test — the paper's Fig. 5 for one model."""
    ts = sorted(curve.by_t)
    mean = np.array([curve.by_t[t].top1 for t in ts])
    std = np.array([curve.by_t[t].top1_std for t in ts])
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(ts, mean, marker="o", label="top-1 (mean over draws)")
    ax.fill_between(ts, mean - std, mean + std, alpha=0.25)
    ax.plot(ts, [curve.by_t[t].top1_ensemble for t in ts], ls="--", marker=".", label="top-1 (draw ensemble)")
    if chosen_t is not None:
        ax.axvline(chosen_t, color="grey", lw=0.8, ls=":", label=f"t_test={chosen_t}")
    ax.set_xlabel("t_test")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "zero-shot accuracy vs t_test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(metrics: ZSLMetrics, class_names: list[str], title: str = "") -> plt.Figure:
    """Row-normalised confusion matrix over the candidate classes (counts over all noise draws)."""
    cm = metrics.confusion.astype(float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = [class_names[c] if c < len(class_names) else str(c) for c in metrics.classes]
    n = len(labels)
    size = min(16.0, 4.5 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    im = ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion at t_test={metrics.t_test} (top-1 {metrics.top1:.1f}%)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
