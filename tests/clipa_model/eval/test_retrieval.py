"""Image-text retrieval: recall@K both ways, on a hand matrix and through the shard reader."""
import io
import math
import os
import tarfile

import pytest
import torch
from PIL import Image

from clipa_model.eval.benchmarks import parse_benchmark
from clipa_model.eval.data import EvalDataError
from clipa_model.preprocess import Preprocess
from clipa_model.eval.retrieval import evaluate_retrieval, recall_at_k
from components.evaluate import run_benchmarks
from support import make_model_artifact

N = 10


def test_recall_on_a_hand_built_similarity_matrix():
    # 3 images, 4 captions: captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2.
    text_image = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.0],    # image 0: best caption 1 (its own)
                        [0.8, 0.0, 0.7, 0.05],   # image 1: best is caption 0 (wrong), 2nd is 2
                        [0.0, 0.2, 0.3, 0.1]])   # image 2: its caption 3 ranks 3rd
    r = recall_at_k(sim, text_image, ks=(1, 2, 3))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@3"] == pytest.approx(1.0)
    # Per caption, the rank of its image among the 3: c0 -> 2nd (image 1 has 0.8 > 0.1),
    # c1 -> 1st, c2 -> 1st (0.7), c3 -> 1st (0.1 > 0.05 > 0.0).
    assert r["text_to_image_R@1"] == pytest.approx(3 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(4 / 4)


class HueModel(torch.nn.Module):
    """Embeds an image by its red level and a caption by the number it names.

    Image i is solid red level 20*i; caption "level i" maps to the same angle, so every
    image matches exactly its own captions unless a caption names another level.
    """

    def encode_image(self, x, normalize=False):
        level = x[:, 0].mean(dim=(1, 2))  # (B,) standardised red
        level = (level * 0.26862954 + 0.48145466) * 255 / 20  # back to i
        return self._angle(level)

    def encode_text(self, tokens, normalize=False):
        return self._angle(tokens[:, 0].float())

    @staticmethod
    def _angle(i):
        t = i * (math.pi / 2) / N
        return torch.stack([torch.cos(t), torch.sin(t)], dim=1)


def _tokenize(texts):
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def _pairs(folder, captions_of) -> str:
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(os.path.join(folder, "pairs-00000.tar"), "w") as tar:
        for i in range(N):
            buf = io.BytesIO()
            Image.new("RGB", (16, 12), (20 * i, 0, 0)).save(buf, format="PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()),
                               (f"{i:04d}.txt", "\n".join(captions_of(i)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder)


def test_retrieval_pairs_images_with_their_captions(tmp_path):
    pp = Preprocess(8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    perfect = _pairs(tmp_path / "perfect", lambda i: [f"level {i}", f"also level {i}"])
    r = evaluate_retrieval(HueModel(), _tokenize, pp, perfect, batch_size=3, device="cpu")
    assert (r["count"], r["captions"]) == (N, 2 * N)
    assert all(v == 1.0 for k, v in r.items() if "R@" in k)
    # Images 0 and 1 get each other's captions: R@1 drops by 2 of 10 both ways; R@5 not.
    swapped = _pairs(tmp_path / "swapped", lambda i: [f"level {({0: 1, 1: 0}).get(i, i)}"])
    r = evaluate_retrieval(HueModel(), _tokenize, pp, swapped, batch_size=4, device="cpu")
    assert r["image_to_text_R@1"] == pytest.approx(0.8)
    assert r["text_to_image_R@1"] == pytest.approx(0.8)
    assert r["image_to_text_R@5"] == r["text_to_image_R@5"] == 1.0


def test_benchmark_specs_and_a_real_model_on_pairs(tmp_path):
    assert parse_benchmark("coco=retrieval:gs://b/coco/") == parse_benchmark(
        {"name": "coco", "task": "retrieval", "path": "gs://b/coco"})
    assert parse_benchmark("zeroshot:/data/imagenet-val").name == "imagenet-val"
    for bad in ("imagenet:/x", "zeroshot", {"task": "zeroshot"}):
        with pytest.raises(EvalDataError, match="benchmark"):
            parse_benchmark(bad)
    pairs = _pairs(tmp_path / "pairs", lambda i: [f"a red square number {i}"])
    model = make_model_artifact(tmp_path / "model")
    out = run_benchmarks(model, ["pairs=retrieval:" + pairs], str(tmp_path / "ev"), batch_size=4,
                         device="cpu", num_workers=0)
    r = out["results"][0]
    assert r["benchmark"] == "pairs" and r["count"] == N
    assert 0 <= r["image_to_text_R@1"] <= r["image_to_text_R@5"] <= r["image_to_text_R@10"] == 1.0
    assert "R@10" in open(tmp_path / "ev" / "report.html").read()


def test_pairs_without_shards_are_an_error_naming_the_path(tmp_path):
    with pytest.raises(EvalDataError, match=str(tmp_path)):
        run_benchmarks(str(tmp_path), [f"retrieval:{tmp_path}"], str(tmp_path / "out"))
