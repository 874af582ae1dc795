"""Helpers shared by tests in several folders (tests/ is on sys.path through conftest.py)."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noise_jpeg(seed: int, side: int = 220) -> bytes:
    """A ``side`` x ``side`` JPEG of upscaled 8x8 noise: distinct bytes (and sha256) per seed."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_model_artifact(path, image_size: int = 28, text_len: int = 8, seed: int = 0) -> str:
    """A tiny-preset Model artifact whose weights are off their init (a wrong load would show)."""
    import torch

    from clipa_model.checkpoint import save_model_artifact
    from clipa_model.config import StageConfig
    from clipa_model.model import build_model
    from clipa_model.train_loop import training_summary

    torch.manual_seed(seed)
    model = build_model("tiny", image_size, text_len)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stage = StageConfig(stage="finetune_336", image_size=image_size, text_len=text_len,
                        samples=4, batch_size=2)
    history = [{"step": 1, "samples_seen": 2, "loss": 1.0}, {"step": 2, "samples_seen": 4, "loss": 0.5}]
    save_model_artifact(str(path), model, "tiny", stage, history, training_summary(history, 1.0))
    return str(path)


# A three-stage run in miniature: (stage, image_size, text_len, mask_ratio, samples, top1, top5).
RUN_STAGES = [("pretrain", 28, 8, 0.0, 64, 0.312, 0.701), ("finetune_224", 42, 16, 0.3, 16, 0.405, 0.8),
              ("finetune_336", 56, 16, 0.4, 8, 0.438, 0.825)]


def make_run_artifacts(folder) -> dict:
    """Model artifacts of RUN_STAGES, their zero-shot metrics, and the data steps' markers.

    Returns:
        {"models": [Model folders], "evals": [metrics dicts], "shards": folder, "filtered": folder}.
    """
    import torch

    from clipa_model.artifacts import write_marker
    from clipa_model.checkpoint import save_model_artifact
    from clipa_model.config import StageConfig
    from clipa_model.model import build_model
    from clipa_model.train_loop import training_summary

    models = []
    for i, (stage, size, text_len, mask, samples, _, _) in enumerate(RUN_STAGES):
        torch.manual_seed(i)
        cfg = StageConfig(stage=stage, image_size=size, text_len=text_len, mask_ratio=mask,
                          samples=samples, batch_size=8, lr=1e-3)
        history = [{"step": 1, "samples_seen": samples, "loss": 1.0}]
        path = os.path.join(str(folder), stage)
        save_model_artifact(path, build_model("tiny", size, text_len), "tiny", cfg, history,
                            training_summary(history, 2.5))
        models.append(path)
    evals = [{"top1": s[5], "top5": s[6], "count": 200.0, "num_classes": 10.0} for s in RUN_STAGES]
    shards, filtered = os.path.join(str(folder), "shards"), os.path.join(str(folder), "filtered")
    write_marker(shards, "shards", count=120, successes=100, failures={"http_404": 20})
    write_marker(filtered, "filtered_shards", input_count=100, count=80, dropped={"min_side": 20})
    return {"models": models, "evals": evals, "shards": shards, "filtered": filtered}
