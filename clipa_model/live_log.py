"""What a running stage shows while it trains: TensorBoard events, history.jsonl, W&B.

    OUTPUT/tensorboard/            events (torch.utils.tensorboard.SummaryWriter)
    $AIP_TENSORBOARD_LOG_DIR/STAGE the same events on Vertex AI, when the custom job has a
                                   TensorBoard instance (``--tensorboard``)
    OUTPUT/history.jsonl           the logged rows so far, one JSON object per line

Scalars, at every log step (x axis: the stage's optimizer step): ``train/loss``,
``train/lr``, ``train/logit_scale``, ``perf/samples_per_s``, ``perf/gflops_per_s``,
``perf/mfu`` (known accelerators), ``perf/data_wait_frac`` (share of the window's wall time
spent waiting for the loader), ``perf/gpu_mem_gib`` (peak, CUDA only) and, every
``zeroshot_every`` samples, ``zeroshot/top1`` / ``zeroshot/top5`` on the eval set.

Only rank 0 writes; every rank calls in, so a zero-shot pass happens at the same step
everywhere (the other ranks wait in their next collective).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from typing import Iterable, Iterator

import torch

from clipa_model.artifacts import join

log = logging.getLogger("clipa.train")

REPORT_TO = ("tensorboard", "wandb")


def parse_report_to(value: str | Iterable[str]) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "" or "none" -> ().

    Raises:
        ValueError: naming an unknown reporter and the known ones.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(n.strip() for n in names if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to={value!r}: unknown {unknown}; expected a comma-separated "
                         f"subset of {REPORT_TO} (or 'none')")
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"report_to={value!r}: the wandb package is not installed here; "
                             "pip install 'clipa-pipeline[wandb]' (or leave wandb out)")
    return names


class TimedBatches:
    """Wraps a batch iterable and adds up the seconds spent waiting in ``next()``."""

    def __init__(self, batches: Iterable):
        self.batches, self.wait = batches, 0.0

    def __iter__(self) -> Iterator:
        it = iter(self.batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield item

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        wait, self.wait = self.wait, 0.0
        return wait


class EventDir:
    """A SummaryWriter for one log folder, local or on an object store.

    tensorboard's event writer appends to its file, which object stores cannot do (gcsfs
    rewrites the object with the appended part only), so for a gs:// folder the writer
    writes to a local temporary folder whose files are copied whole to the destination at
    most every ``sync_secs`` and when the stage ends.
    """

    def __init__(self, logdir: str, purge_step: int | None = None, sync_secs: float = 30.0):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = logdir if "://" in logdir else None
        self.local = tempfile.mkdtemp(prefix="clipa-tb-") if self.remote else logdir
        os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local, purge_step=purge_step, flush_secs=10)
        self.sync_secs, self.last_sync = sync_secs, None

    def add_scalars(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.sync()

    def sync(self, force: bool = False) -> None:
        """Copy the event files to an object-store destination (whole files)."""
        now = time.monotonic()
        if self.remote is None or (not force and self.last_sync is not None
                                   and now - self.last_sync < self.sync_secs):
            return
        import fsspec

        self.writer.flush()
        fs, root = fsspec.core.url_to_fs(self.remote)
        for name in os.listdir(self.local):
            fs.put_file(os.path.join(self.local, name), f"{root.rstrip('/')}/{name}")
        self.last_sync = now

    def close(self) -> None:
        self.writer.close()
        self.sync(force=True)
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


class ZeroShotProbe:
    """Zero-shot top-1 / top-5 of the training model on an eval set, RNG untouched.

    Args:
        eval_dir: eval_set artifact (or any set ``open_classification_set`` reads).
        preset, image_size, text_len: the stage's model (its own preprocessing is used).
    """

    def __init__(self, eval_dir: str, preset: str, image_size: int, text_len: int,
                 batch_size: int = 100):
        from clipa_model.checkpoint import model_config
        from clipa_model.eval.data import open_classification_set
        from clipa_model.model import get_tokenizer
        from clipa_model.preprocess import Preprocess

        self.dataset = open_classification_set(eval_dir)  # a bad set fails before training
        self.tokenizer = get_tokenizer(preset, text_len)
        self.preprocess = Preprocess.from_model_config(model_config(preset, image_size, text_len))
        self.batch_size = batch_size

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict:
        """{"top1", "top5"}; the model is back in train mode and every RNG as it was."""
        from clipa_model.eval.zeroshot import evaluate_zero_shot

        py_state = random.getstate()
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            result = evaluate_zero_shot(model, self.tokenizer, self.preprocess, self.dataset,
                                        self.batch_size, str(device), num_workers=0)
        random.setstate(py_state)
        model.train()
        return {"top1": result["top1"], "top5": result["top5"]}


class LiveLog:
    """The ``on_log`` hook of ``train_loop``: scalars, live history and zero-shot probes.

    Args:
        output_dir: the stage's Model artifact folder (local or fsspec URL).
        stage: StageConfig (name, ``zeroshot_every``); start_step, history: resume position.
        report_to: ("tensorboard", "wandb") or a subset.
        is_main: rank 0 (the only writer); batches: the loader, to time its waits.
        probe: a ``ZeroShotProbe`` (None: no zero-shot during training).
        run_id: W&B run id (the stage key: a resumed stage continues the same W&B run).
        config: the resolved config, shown with the W&B run.
    """

    def __init__(self, output_dir: str, stage, start_step: int, history: list[dict],
                 report_to=("tensorboard",), is_main: bool = True,
                 batches: TimedBatches | None = None, probe: ZeroShotProbe | None = None,
                 run_id: str = "", config: dict | None = None):
        self.output_dir, self.stage, self.is_main = output_dir, stage, is_main
        self.batches, self.probe = batches, probe
        self.model = self.device = None
        self.history_path = join(output_dir, "history.jsonl")
        every = stage.zeroshot_every
        done = history[-1]["samples_seen"] if history else 0
        self.next_zeroshot = (done // every + 1) * every if every else None
        self.t_window = time.perf_counter()
        self.writers, self.wandb = [], None
        if not is_main:
            return
        self._start_history(history)
        if "tensorboard" in report_to:
            self.writers = self._tensorboard_writers(start_step)
        if "wandb" in report_to:
            self.wandb = _start_wandb(output_dir, stage.stage, run_id, config)

    def attach(self, model: torch.nn.Module, device: torch.device) -> "LiveLog":
        """The model the zero-shot probe evaluates (the plain module, not its DDP wrapper)."""
        self.model, self.device = model, device
        return self

    def _tensorboard_writers(self, start_step: int) -> list:
        # purge_step: a resumed stage hides the events an interrupted run wrote past it.
        purge = start_step + 1 if start_step else None
        dirs = [join(self.output_dir, "tensorboard")]
        vertex = os.environ.get("AIP_TENSORBOARD_LOG_DIR")
        if vertex:
            dirs.append(join(vertex, self.stage.stage))
        return [EventDir(d, purge) for d in dirs]

    def _start_history(self, history: list[dict]) -> None:
        rows = [r for r in history if "samples_per_s" in r]  # the logged rows
        if "://" not in self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
        self._rows = rows
        self._write_history(rows, mode="w")

    def _write_history(self, rows: list[dict], mode: str) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if "://" in self.history_path:  # objects cannot be appended to: rewrite
            import fsspec

            with fsspec.open(self.history_path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self._rows))
            return
        with open(self.history_path, mode) as f:
            f.write(text)
            f.flush()

    def __call__(self, row: dict) -> None:
        """Called by ``train_loop`` with every logged row (on every rank)."""
        now = time.perf_counter()
        if self.batches is not None:
            row["data_wait_frac"] = min(1.0, self.batches.take_wait() / max(now - self.t_window, 1e-9))
        if self.device is not None and self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.next_zeroshot is not None and row["samples_seen"] >= self.next_zeroshot:
            self._zeroshot(row)
        self.t_window = time.perf_counter()  # the probe's time is not the loader's
        if self.is_main:
            self._write(row)

    def _zeroshot(self, row: dict) -> None:
        every = self.stage.zeroshot_every
        self.next_zeroshot = (row["samples_seen"] // every + 1) * every
        if not self.is_main or self.probe is None or self.model is None:
            return
        result = self.probe(self.model, self.device)
        row["zeroshot_top1"], row["zeroshot_top5"] = result["top1"], result["top5"]
        log.info("%s step %d: zero-shot top-1 %.3f top-5 %.3f", self.stage.stage, row["step"],
                 result["top1"], result["top5"])

    def _write(self, row: dict) -> None:
        self._rows.append(row)
        self._write_history([row], mode="a")
        scalars = {"train/loss": row["loss"], "train/lr": row["lr"],
                   "train/logit_scale": 1.0 / row["temperature"],
                   "train/samples_seen": row["samples_seen"]}
        for key, name in (("samples_per_s", "perf/samples_per_s"),
                          ("gflops_per_s", "perf/gflops_per_s"), ("mfu", "perf/mfu"),
                          ("data_wait_frac", "perf/data_wait_frac"),
                          ("gpu_mem_gib", "perf/gpu_mem_gib"),
                          ("zeroshot_top1", "zeroshot/top1"), ("zeroshot_top5", "zeroshot/top5")):
            if key in row:
                scalars[name] = row[key]
        for writer in self.writers:
            writer.add_scalars(scalars, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(output_dir: str, name: str, run_id: str, config: dict | None):
    """A W&B run (offline when WANDB_MODE=offline); resumed by id when the stage resumes."""
    import wandb

    local = output_dir if "://" not in output_dir else None
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "clipa"), name=name,
                      id=run_id or None, resume="allow" if run_id else None, dir=local,
                      config=config or {})
