"""Zero-shot evaluation: agrees with a hand computation; colour baseline; the artifact."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clipa_model.artifacts import MARKER, read_marker
from clipa_model.checkpoint import model_config, save_model_artifact
from clipa_model.config import StageConfig
from clipa_model.data import center_resize, normalize
from clipa_model.model import build_model, get_tokenizer
from clipa_model.train import summarize
from clipa_model.zeroshot import colour_baseline_top1, zero_shot_evaluate
from components.evaluate import run_evaluate
from pipelines.demo_data import CLASSNAMES, TEMPLATES, _samples, write_eval_set

SIZE = 28


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    write_eval_set(str(out), n_per_class=1, seed=3, size=48)
    return str(out)


def _hand_zero_shot(model, cfg, n_images):
    """Zero-shot predictions written out step by step, for a few eval images."""
    tokenizer = get_tokenizer("tiny", cfg["text_len"])
    with torch.no_grad():
        class_emb = []
        for name in CLASSNAMES:
            t = model.encode_text(tokenizer([tpl.format(name) for tpl in TEMPLATES]))
            t = t / t.norm(dim=-1, keepdim=True)
            mean = t.mean(0)
            class_emb.append(mean / mean.norm())
        class_emb = torch.stack(class_emb)  # (C, D)
        preds, labels = [], []
        for label, image, _ in list(_samples(len(CLASSNAMES), 3 + 1_000_003, 48))[:n_images]:
            # The eval set stores JPEGs: decode the same bytes the pipeline reads.
            import io
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            pixels = center_resize(Image.open(buf).convert("RGB"), SIZE)  # (S, S, 3) uint8
            x = normalize(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None], cfg["mean"], cfg["std"])
            f = model.encode_image(x)[0]
            preds.append(int((class_emb @ (f / f.norm())).argmax()))
            labels.append(label)
    return preds, labels


def test_zero_shot_matches_a_hand_computation(eval_dir):
    torch.manual_seed(0)
    model = build_model("tiny", SIZE, 8).eval()
    cfg = model_config("tiny", SIZE, 8)
    result = zero_shot_evaluate(model, cfg, eval_dir, batch_size=4)
    assert result["count"] == len(CLASSNAMES)
    preds, labels = _hand_zero_shot(model, cfg, len(CLASSNAMES))
    hand_top1 = float(np.mean([p == y for p, y in zip(preds, labels)]))
    assert result["top1"] == pytest.approx(hand_top1)
    assert result["top1"] <= result["top5"] <= 1.0
    per_class = result["per_class_top1"]
    assert len(per_class) == len(CLASSNAMES)
    assert np.nanmean(per_class) == pytest.approx(result["top1"])  # 1 image per class


def test_colour_baseline_sees_colour_and_only_colour():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(20)  # (200,)
    by_colour = torch.stack([labels * 20.0, labels * 5.0, 255 - labels * 20.0], 1)
    assert colour_baseline_top1(by_colour + torch.rand(200, 3, generator=gen), labels) > 0.95
    random_colour = torch.rand(200, 3, generator=gen) * 255
    assert colour_baseline_top1(random_colour, labels) < 0.3


def test_run_evaluate_writes_metrics_report_and_marker(eval_dir, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", SIZE, 8)
    stage = StageConfig(stage="pretrain", image_size=SIZE, text_len=8, samples=4, batch_size=2)
    history = [{"step": 1, "samples_seen": 2, "loss": 1.0}, {"step": 2, "samples_seen": 4,
                                                              "loss": 0.5}]
    model_dir = str(tmp_path / "model")
    save_model_artifact(model_dir, model, "tiny", stage, history, summarize(history, 1.0))
    out = str(tmp_path / "evaluation")
    result = run_evaluate(model_dir, eval_dir, out, batch_size=8)
    marker = read_marker(out, "evaluation")
    for key in ("top1", "top5", "count", "colour_baseline_top1", "seconds"):
        assert key in marker
    assert marker["top1"] == result["top1"]
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["count"] == len(CLASSNAMES)
    html = open(os.path.join(out, "report.html")).read()
    assert all(name in html for name in CLASSNAMES) and "Training curve" in html
    for name in ("metrics.json", "report.html"):
        assert os.path.getmtime(os.path.join(out, name)) <= os.path.getmtime(
            os.path.join(out, MARKER))
