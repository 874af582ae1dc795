"""What the science benches share (bench_inverse_scaling.py, bench_token_scaling.py): the
demo data made once per work folder, a zero-shot score through the evaluate step, and a
top-1 figure. Imported from the scripts' own folder (``python bench/NAME.py`` puts
bench/ first on sys.path)."""
from __future__ import annotations

import contextlib
import os


def demo_data(root: str, n_train: int, eval_per_class: int, image_px: int,
              seed: int = 0) -> tuple[str, str]:
    """Demo training shards and a held-out eval set (pipelines/demo_data.py) under
    ``root``, rendered only if a finished pair is not there already."""
    from pipelines.demo_data import write_demo_shards, write_eval_set

    shards, eval_dir = os.path.join(root, "shards"), os.path.join(root, "eval")
    if not os.path.exists(os.path.join(shards, "clipa_artifact.json")) or not os.path.isdir(eval_dir):
        shards = write_demo_shards(root, n_train, seed=seed, size=image_px)
        write_eval_set(eval_dir, eval_per_class, seed=seed, size=image_px)
    return shards, eval_dir


def zero_shot(model_dir: str, eval_dir: str) -> dict:
    """Top-1 / top-5 / chance of a Model artifact, as the evaluate step scores it."""
    from components.evaluate import run_evaluate

    r = run_evaluate(model_dir, eval_dir, model_dir + "-eval", num_workers=0, device="cpu")
    return {"top1": r["top1"], "top5": r["top5"], "chance": 1 / r["num_classes"]}


@contextlib.contextmanager
def top1_figure(path: str, title: str, xlabel: str, size=(7, 4.5), **xscale):
    """Axes for a zero-shot top-1 (%) plot; saved as a PNG at ``path`` when the block ends.

    ``xscale``: keyword arguments of ``Axes.set_xscale("log", ...)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield ax
    ax.set_xscale("log", **xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
