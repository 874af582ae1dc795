"""Small matplotlib figures (Agg backend, returned as PNG bytes) for artifacts and reports."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be set first)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curve(history: list[dict], title: str = "") -> bytes:
    """Training loss vs samples seen: raw per step and a moving average.

    Args:
        history: rows with "samples_seen" and "loss".

    Returns:
        PNG bytes.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["samples_seen"] for r in history]
    y = [r["loss"] for r in history]
    ax.plot(x, y, lw=0.6, alpha=0.4, label="loss")
    k = max(1, len(y) // 20)
    if len(y) > k:
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1])
                  for i in range(len(y))]
        ax.plot(x, smooth, lw=1.5, label=f"mean of {k} steps")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
