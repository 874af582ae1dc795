"""Exact contrastive gradient accumulation: K micro-batches give the full batch's loss and
gradients (fp32; tolerance rel 1e-4 / abs 1e-6), alone and across 2 gloo processes."""
import os

import pytest
import torch

from clipa_model.config import ConfigError, StageConfig
from clipa_model.distributed import DistEnv, init_process_group, resolve_dist_env
from clipa_model.launch import NodeLayout, launch
from clipa_model.model import build_model, get_tokenizer
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
from clipa_model.train_loop import accumulate_gradients, make_loss, prepare_model
from clipa_model.data import normalize

BATCH, K = 16, 4


def _batch():
    g = torch.Generator().manual_seed(7)
    words = ["red", "blue", "circle", "star", "stripes", "dots", "large", "small"]
    idx = torch.randint(0, len(words), (BATCH, 3), generator=g).tolist()
    tokens = get_tokenizer("tiny", 8)([" ".join(words[i] for i in row) for row in idx])
    return torch.randint(0, 256, (BATCH, 3, 28, 28), generator=g, dtype=torch.uint8), tokens


def _model(mask_ratio=0.0, grad_checkpointing=False):
    torch.manual_seed(0)
    model = build_model("tiny", 28, 8, mask_ratio=mask_ratio)
    model.set_grad_checkpointing(grad_checkpointing)
    return model.train()


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_batch(model, images, tokens, loss_fn):
    """Reference: one forward on the whole batch, one backward."""
    image_f, text_f, scale = model(normalize(images, IMAGE_MEAN, IMAGE_STD), tokens)
    loss = loss_fn(image_f, text_f, scale)
    loss.backward()
    return loss.detach(), _grads(model)


def _accumulated(model, images, tokens, loss_fn, forward=None):
    loss, _ = accumulate_gradients(forward or model, model, loss_fn, images, tokens, K, "fp32",
                                   IMAGE_MEAN, IMAGE_STD, torch.device("cpu"))
    return loss, _grads(model)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_accumulated_loss_and_gradients_equal_one_full_batch_step(grad_checkpointing):
    images, tokens = _batch()
    loss_fn = make_loss(DistEnv())
    full_loss, full = _full_batch(_model(), images, tokens, loss_fn)
    acc_loss, acc = _accumulated(_model(grad_checkpointing=grad_checkpointing), images, tokens,
                                 loss_fn)
    assert acc_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    _assert_same(full, acc)
    # Not vacuous: averaging the micro-batches' own losses (plain accumulation) differs.
    naive = _model()
    for im, tok in zip(images.chunk(K), tokens.chunk(K)):
        f_i, f_t, s = naive(normalize(im, IMAGE_MEAN, IMAGE_STD), tok)
        (loss_fn(f_i, f_t, s) / K).backward()
    with pytest.raises(AssertionError):
        _assert_same(full, _grads(naive))


def test_patch_masks_are_the_same_in_both_passes():
    """With random masking, the reference is the full-batch loss over the micro-batches'
    features computed with a graph in one go (same RNG stream): the memory-hungry way."""
    images, tokens = _batch()
    loss_fn = make_loss(DistEnv())
    ref = _model(mask_ratio=0.5)
    torch.manual_seed(3)
    feats = [ref(normalize(im, IMAGE_MEAN, IMAGE_STD), tok)
             for im, tok in zip(images.chunk(K), tokens.chunk(K))]
    loss = loss_fn(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), feats[0][2])
    loss.backward()
    acc_model = _model(mask_ratio=0.5)
    torch.manual_seed(3)
    acc_loss, acc = _accumulated(acc_model, images, tokens, loss_fn)
    assert acc_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    _assert_same(_grads(ref), acc)


def test_accum_steps_must_divide_the_batch():
    with pytest.raises(ConfigError, match="accum_steps=3.*divisor of batch_size=16"):
        StageConfig(batch_size=16, accum_steps=3)
    with pytest.raises(ConfigError, match="accum_steps=0"):
        StageConfig(batch_size=16, accum_steps=0)
    from clipa_model.train_stage import check_batch

    with pytest.raises(ConfigError, match="world size 4 x accum_steps 4 = 16"):
        check_batch(StageConfig(batch_size=24, accum_steps=4), 4)


def gloo_rank_grads(out_dir: str) -> None:
    """One of 2 launched processes: DDP + accumulation on this rank's half of the batch."""
    torch.set_num_threads(1)
    env = resolve_dist_env()
    init_process_group(env, "cpu")
    images, tokens = _batch()
    half = slice(env.rank * BATCH // 2, (env.rank + 1) * BATCH // 2)
    model = _model()
    stage = StageConfig(image_size=28, text_len=8, batch_size=BATCH, accum_steps=K // 2)
    forward = prepare_model(model, stage, torch.device("cpu"), env)
    loss, _ = accumulate_gradients(forward, model, make_loss(env), images[half], tokens[half],
                                   K // 2, "fp32", IMAGE_MEAN, IMAGE_STD, torch.device("cpu"))
    torch.save({"loss": loss, "grads": _grads(model)}, os.path.join(out_dir, f"rank{env.rank}.pt"))


@pytest.mark.slow
def test_accumulation_with_two_gloo_processes_equals_the_full_batch(tmp_path):
    launch(gloo_rank_grads, (str(tmp_path),), NodeLayout("cpu", procs_per_node=2,
                                                         master_port=_free_port()))
    images, tokens = _batch()
    full_loss, full = _full_batch(_model(), images, tokens, make_loss(DistEnv()))
    got = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # Each rank's loss covers its rows against all columns; their mean is the full loss.
    assert (got[0]["loss"] + got[1]["loss"]).item() / 2 == pytest.approx(full_loss.item(), rel=1e-5)
    for rank in range(2):
        _assert_same(full, got[rank]["grads"])  # DDP averaged: every rank has the full gradient


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
