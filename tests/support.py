"""Helpers shared by tests in several folders (tests/ is on sys.path through conftest.py)."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
