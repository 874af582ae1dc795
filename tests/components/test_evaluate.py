"""Zero-shot evaluation: agrees with open_clip's own code; layouts, preprocessing, errors."""
import io
import json
import os
import tempfile
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipa_model.artifacts import MARKER, read_marker
from clipa_model.eval.data import EvalDataError, load_classes, open_classification_set
from clipa_model.eval.models import ModelRefError, load_eval_model
from clipa_model.export import export_open_clip
from clipa_model.eval.zeroshot import colour_baseline_top1, pick_device, zero_shot_classifier
from components.evaluate import evaluate, run_evaluate
from support import make_model_artifact

NAMES = [f"thing {i}" for i in range(12)]
TEMPLATES = ["a photo of a {}.", "a {}.", "art of the {}."]
PER_CLASS = 3


def _jpeg(rng, w: int, h: int) -> bytes:
    # Smooth random blobs: JPEG-friendly and different per image.
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, samples, per_shard: int = 20) -> str:
    """webdataset shards KEY.jpg + KEY.cls of (label, jpeg) samples."""
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with tarfile.open(os.path.join(folder, f"shard-{s // per_shard:05d}.tar"), "w") as tar:
            for i, (label, jpg) in enumerate(samples[s:s + per_shard], start=s):
                _add(tar, f"{i:06d}.jpg", jpg)
                _add(tar, f"{i:06d}.cls", str(label).encode())
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 36 JPEGs (varied sizes and aspect ratios) as ImageFolder and as shards."""
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    samples = [(c, _jpeg(rng, int(rng.integers(24, 70)), int(rng.integers(24, 70))))
               for c in range(len(NAMES)) for _ in range(PER_CLASS)]
    for i, (label, jpg) in enumerate(samples):
        os.makedirs(root / "folder" / f"c{label:02d}", exist_ok=True)
        (root / "folder" / f"c{label:02d}" / f"{i}.jpg").write_bytes(jpg)
    (root / "classes.json").write_text(json.dumps({"classnames": NAMES, "templates": TEMPLATES}))
    return {"folder": str(root / "folder"), "shards": write_shards(root / "shards", samples),
            "classes": str(root / "classes.json"), "samples": samples, "root": root}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model_dir = make_model_artifact(root / "model")
    export = export_open_clip(model_dir, str(root / "export"))
    return {"artifact": model_dir, "export": export["out_dir"],
            "model_cfg": export["open_clip_config"]["model_cfg"], "root": root}


def _open_clip_reference(model_name: str, pretrained, data) -> tuple[float, float, torch.Tensor]:
    """top-1 / top-5 the way open_clip evaluates: its model loader, eval transform,
    ``build_zero_shot_classifier`` and open_clip_train's zero-shot loop (``run``, restated
    here because its ``accuracy`` calls float() on a 1-element array, which numpy 2 refuses).
    """
    import torchvision

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(
        model, open_clip.get_tokenizer(model_name), NAMES, TEMPLATES, num_classes_per_batch=5)
    loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(data["folder"], transform=preprocess), batch_size=7)
    top1 = top5 = n = 0
    with torch.inference_mode():
        for images, target in loader:
            logits = 100.0 * model(image=images)[0] @ classifier
            pred = logits.topk(5, 1, True, True)[1].t()  # (5, B)
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            top1 += correct[:1].reshape(-1).float().sum().item()
            top5 += correct[:5].reshape(-1).float().sum().item()
            n += images.size(0)
    return top1 / n, top5 / n, classifier


def test_numbers_agree_with_open_clips_zero_shot_code(data, models, tmp_path):
    top1, top5, classifier = _open_clip_reference(f"local-dir:{models['export']}", None, data)
    assert 0 < top5 < 1 and top1 < top5  # not a degenerate case
    em = load_eval_model(models["artifact"])
    ours = zero_shot_classifier(em.model, em.tokenizer, NAMES, TEMPLATES, pick_device("cpu"))
    torch.testing.assert_close(ours, classifier, atol=1e-5, rtol=0)
    for ref in (models["artifact"], models["export"]):  # our checkpoint and its export
        for layout in ("folder", "shards"):
            out = str(tmp_path / f"{os.path.basename(ref)}-{layout}")
            result = run_evaluate(ref, data[layout], out, batch_size=8, classes=data["classes"],
                                  device="cpu", num_workers=0)
            assert result["count"] == len(data["samples"])
            assert (result["top1"], result["top5"]) == pytest.approx((top1, top5), abs=1e-9), (ref, layout)


def test_open_clip_name_and_pretrained_file_use_that_models_preprocessing(data, models, tmp_path):
    cfg = tmp_path / "clipa-tiny-eval-test.json"
    cfg.write_text(json.dumps(models["model_cfg"]))
    open_clip.add_model_config(str(cfg))
    weights = os.path.join(models["export"], "open_clip_model.safetensors")
    ref = f"open_clip:clipa-tiny-eval-test:{weights}"
    em = load_eval_model(f"mine={ref}")
    assert em.name == "mine" and em.source == "open_clip"
    # open_clip's defaults for a config without a pretrained tag: bicubic, 28 px (its size).
    assert (em.preprocess.image_size, em.preprocess.interpolation) == (28, "bicubic")
    top1, top5, _ = _open_clip_reference("clipa-tiny-eval-test", weights, data)
    result = run_evaluate(ref, data["folder"], str(tmp_path / "out"), batch_size=16,
                          classes=data["classes"], device="cpu", num_workers=0)
    assert (result["top1"], result["top5"]) == pytest.approx((top1, top5), abs=1e-9)
    assert result["preprocess"]["interpolation"] == "bicubic"


def test_each_checkpoint_is_evaluated_at_its_own_size(data, models, tmp_path):
    big = make_model_artifact(models["root"] / "model42", image_size=42)
    result = run_evaluate(big, data["shards"], str(tmp_path / "out"), classes=data["classes"],
                          device="cpu", num_workers=0)
    assert result["preprocess"]["image_size"] == 42
    assert result["preprocess"]["interpolation"] == "bilinear"  # what model_config.json says
    assert read_marker(str(tmp_path / "out"), "evaluation")["num_classes"] == len(NAMES)


def test_report_metrics_and_marker_written_last(data, models, tmp_path):
    out = str(tmp_path / "evaluation")
    result = run_evaluate(models["artifact"], data["shards"], out, batch_size=8,
                          classes=data["classes"], device="cpu", num_workers=1)
    marker = read_marker(out, "evaluation")
    assert marker["top1"] == result["top1"] and marker["count"] == len(data["samples"])
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert len(metrics["per_class_top1"]) == len(NAMES)
    assert np.nanmean(metrics["per_class_top1"]) == pytest.approx(result["top1"])  # balanced set
    html = open(os.path.join(out, "report.html")).read()
    assert all(name in html for name in NAMES) and "Training curve" in html
    assert html.count("data:image/png;base64") == 2  # per-class plot + training curve
    for name in ("metrics.json", "report.html", "results.json"):
        assert os.path.getmtime(os.path.join(out, name)) <= os.path.getmtime(os.path.join(out, MARKER))


def test_kfp_component_logs_metrics_and_copies_report(data, models, tmp_path):
    from kfp.dsl import HTML, Dataset, Metrics, Model

    from pipelines.demo_data import CLASSNAMES, write_eval_set

    eval_set = str(tmp_path / "eval_set")
    write_eval_set(eval_set, n_per_class=1, seed=3, size=48)
    metrics, report = Metrics(uri=str(tmp_path / "metrics")), HTML(uri=str(tmp_path / "report.html"))
    evaluate.python_func(model=Model(uri=models["artifact"]), eval_set=Dataset(uri=eval_set),
                         metrics=metrics, report=report)
    assert {"top1", "top5", "count", "num_classes", "colour_baseline_top1", "seconds"} <= set(metrics.metadata)
    assert metrics.metadata["num_classes"] == len(CLASSNAMES)  # the eval set's own classes.json
    assert "<html" in open(report.path).read()


def test_kfp_component_leaves_no_temporary_folder_on_success_or_failure(data, models, tmp_path,
                                                                      monkeypatch):
    from kfp.dsl import HTML, Dataset, Metrics, Model

    from pipelines.demo_data import write_eval_set

    tmp = tmp_path / "tmp"  # this test's system temporary folder, listed afterwards
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_eval_set(good, n_per_class=1, seed=3, size=48)
    write_eval_set(bad, n_per_class=1, seed=3, size=48)
    os.remove(os.path.join(bad, "eval-00000.tar"))  # the marker names a shard that is gone
    outputs = dict(metrics=Metrics(uri=str(tmp_path / "m")), report=HTML(uri=str(tmp_path / "r.html")))
    evaluate.python_func(model=Model(uri=models["artifact"]), eval_set=Dataset(uri=good), **outputs)
    with pytest.raises(Exception):
        evaluate.python_func(model=Model(uri=models["artifact"]), eval_set=Dataset(uri=bad), **outputs)
    assert os.listdir(tmp) == []  # clipa-eval-* removed both times


def test_class_names_default_to_open_clips_imagenet_metadata(tmp_path):
    names, templates, source = load_classes(None)
    assert (len(names), len(templates), source) == (1000, 80, "imagenet")
    assert names == list(open_clip.IMAGENET_CLASSNAMES)
    for wnid in ("n01440764", "n01443537"):  # an ImageNet-style tree: wnid folders
        os.makedirs(tmp_path / "inet" / wnid)
        Image.new("RGB", (8, 8)).save(tmp_path / "inet" / wnid / "a.jpg")
    ds = open_classification_set(str(tmp_path / "inet"))
    assert ds.classnames[:2] == ["tench", "goldfish"] and ds.count == 2
    os.makedirs(tmp_path / "pets" / "cat")
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "cat" / "a.png")
    assert open_classification_set(str(tmp_path / "pets")).classnames == ["cat"]


def test_labels_outside_the_class_list_are_an_error_before_writing(data, models, tmp_path):
    bad = write_shards(tmp_path / "bad", [(0, data["samples"][0][1]), (12, data["samples"][1][1])])
    out = tmp_path / "out"
    with pytest.raises(EvalDataError, match=r"label 12, outside the 12 classes"):
        run_evaluate(models["artifact"], bad, str(out), classes=data["classes"], device="cpu",
                     num_workers=0)
    assert not out.exists()
    tree = tmp_path / "tree"
    for i in range(13):
        os.makedirs(tree / f"k{i:02d}")
        Image.new("RGB", (8, 8)).save(tree / f"k{i:02d}" / "a.jpg")
    with pytest.raises(EvalDataError, match=r"13 class folders but 12 class names"):
        run_evaluate(models["artifact"], str(tree), str(out), classes=data["classes"])
    assert not out.exists()


@pytest.mark.parametrize("problem", ["garbage_checkpoint", "garbage_open_clip_file", "plain_folder",
                                     "unknown_architecture"])
def test_a_model_that_is_not_a_checkpoint_is_a_clear_error(problem, data, models, tmp_path):
    import shutil

    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    if problem == "garbage_checkpoint":
        ref = str(tmp_path / "m")
        shutil.copytree(models["artifact"], ref)
        (tmp_path / "m" / "checkpoint.pt").write_bytes(garbage.read_bytes())
        expected = r"checkpoint.pt: not a checkpoint"
    elif problem == "garbage_open_clip_file":
        ref, expected = f"open_clip:ViT-B-32:{garbage}", r"weights.bin: not a checkpoint"
    elif problem == "plain_folder":
        ref, expected = str(tmp_path), r"not a model; expected a clipa Model artifact"
    else:
        ref, expected = f"open_clip:ViT-Nope-99:{garbage}", r"unknown open_clip architecture 'ViT-Nope-99'"
    out = tmp_path / "out"
    with pytest.raises(ModelRefError, match=expected):
        run_evaluate(ref, data["shards"], str(out), classes=data["classes"])
    assert not out.exists()


def test_colour_baseline_sees_colour_and_only_colour():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(20)  # (200,)
    by_colour = torch.stack([labels * 20.0, labels * 5.0, 255 - labels * 20.0], 1)
    assert colour_baseline_top1(by_colour + torch.rand(200, 3, generator=gen), labels) > 0.95
    random_colour = torch.rand(200, 3, generator=gen) * 255
    assert colour_baseline_top1(random_colour, labels) < 0.3
