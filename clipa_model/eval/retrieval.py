"""Image-text retrieval: recall@K in both directions on a webdataset of pairs.

Every image and every caption is embedded once; similarities are cosine (N_img, N_txt).
Image -> text: an image is a hit at K if any of its own captions is among its K nearest
captions. Text -> image: a caption is a hit at K if its image is among its K nearest
images (the definitions of CLIP / clip_benchmark on Flickr30k and MSCOCO).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipa_model.eval.data import open_pair_set, pair_batches
from clipa_model.preprocess import Preprocess
from clipa_model.eval.zeroshot import autocast_for, encode_images, pick_device

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str],
                 device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """(N, D) L2-normalised float32 text embeddings, on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        with autocast_for(device):
            out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out)


def recall_at_k(sim: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict:
    """Recall@K both ways from an image-text similarity matrix.

    Args:
        sim: (N_img, N_txt) similarities.
        text_image: (N_txt,) index of the image each caption belongs to.
        ks: the K values (each capped at the number of candidates).

    Returns:
        {"image_to_text_R@K": ..., "text_to_image_R@K": ...} as fractions.
    """
    n_img, n_txt = sim.shape
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[text_image, torch.arange(n_txt)] = True  # (N_img, N_txt): caption j describes image i
    out = {}
    for k in ks:
        top_txt = sim.topk(min(k, n_txt), dim=1).indices  # (N_img, k)
        i2t = int(positive.gather(1, top_txt).any(dim=1).sum()) / n_img
        top_img = sim.topk(min(k, n_img), dim=0).indices  # (k, N_txt)
        t2i = int((top_img == text_image[None, :]).any(dim=0).sum()) / n_txt
        out[f"image_to_text_R@{k}"] = i2t
        out[f"text_to_image_R@{k}"] = t2i
    return out


def evaluate_retrieval(model: torch.nn.Module, tokenizer: Callable, pp: Preprocess, path: str,
                       batch_size: int = 256, device: str = "auto", num_workers: int = 0) -> dict:
    """Recall@1/5/10 both ways of ``model`` on the image-text pairs at ``path``.

    Returns:
        The recalls (``recall_at_k``) plus "count" (images), "captions", "preprocess".
    """
    dev = pick_device(device)
    model = model.to(dev).eval()
    shards, count = open_pair_set(path)
    batches = pair_batches(shards, pp, batch_size, num_workers)
    img_feats, captions, _ = encode_images(model, batches, pp, dev, count, "retrieval")
    texts = [c for caps in captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    txt_feats = encode_texts(model, tokenizer, texts, dev)
    result = recall_at_k(img_feats @ txt_feats.T, text_image)
    result.update(count=len(captions), captions=len(texts), preprocess=pp.to_dict())
    return result
