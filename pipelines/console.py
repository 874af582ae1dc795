"""The console view of a local run: a line per step, a live rate line, the full log in a file.

kfp.local prints everything a task does (its executor input JSON, every log line of the
step, the outputs) to ``sys.stdout``: about 1,600 lines for ``make demo``. ``LiveView`` is a
text stream that takes that output whole, writes it unchanged to ``LOG`` and shows the
person at the console only

    [09:01:02] pretrain ...
               pretrain: step 320/1250 (26%), loss 3.214, 245.9 samples/s
    [09:03:14] pretrain done in 132.1 s: 40,000 samples, 303.2 samples/s

and, when a step fails, the last lines of its log. On a terminal the rate line is
rewritten in place; in a file or a pipe it is printed at each quarter of the step, so a
CI log stays short. ``verbose=True`` passes the full output through as well.
"""
from __future__ import annotations

import io
import re
import time
from collections import deque
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([\w-]+)'")
TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
# clipa_model/train_loop.py's log line
TRAIN_STEP = re.compile(r"(\w+) step (\d+)/(\d+) samples (\d+) loss ([\d.naif]+) .* ([\d.]+) samples/s")
# components/download/img2dataset_runner.py's progress line
DOWNLOAD = re.compile(r"download progress: (\d+) of (\d+) shards")
# components/evaluate.py's result line
EVAL = re.compile(r"top1 ([\d.]+) top5 ([\d.]+)")
# components/filter_shard/component.py's result line
FILTER = re.compile(r"filter_shard: kept (\d+) of (\d+) samples")
# clipa_model/train_stage.py's resume line
RESUMED = re.compile(r"(\w+): resumed from step (\d+)")
FAILURE_TAIL = 25  # log lines of a failed step shown on the console


class _Step:
    """What the view knows about one running task."""

    def __init__(self, name: str, now: float):
        self.name, self.start, self.facts = name, now, {}
        self.tail: deque[str] = deque(maxlen=FAILURE_TAIL)
        self.quarter = 0  # quarters of the step already reported (non-terminal consoles)


class LiveView(io.TextIOBase):
    """A writable text stream: everything to ``log``, a short view to ``console``.

    Args:
        log: the full log (kfp.local's output, unchanged).
        console: where the short view goes (a terminal gets in-place progress).
        verbose: also pass the full output to ``console``.
    """

    def __init__(self, log: TextIO, console: TextIO, verbose: bool = False, clock=time.time):
        self.log, self.console, self.verbose, self.clock = log, console, verbose, clock
        # kfp.local names tasks by key ("finetune-2"); the console shows display names
        # ("finetune-336") once the runner knows them.
        self.display_names: dict[str, str] = {}
        self.tty = console.isatty()
        self._partial = ""
        self._step: _Step | None = None
        self._rate_shown = False
        self.steps: list[tuple[str, str, float, dict]] = []  # (name, status, seconds, facts)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.console.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._on_line(_ANSI.sub("", line).rstrip())
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    # ------------------------------------------------------------ one line of kfp.local's output

    def _on_line(self, line: str) -> None:
        if m := TASK_START.search(line):
            return self._start(m.group(1))
        if m := TASK_END.search(line):
            return self._end(m.group(1), m.group(2))
        step = self._step
        if step is None or not line.strip():
            return
        step.tail.append(line)
        if m := TRAIN_STEP.search(line):
            stage, done, total, samples, loss, rate = m.groups()
            step.facts.update(stage=stage, samples=int(samples), rate=float(rate), loss=loss)
            self._progress(int(done), int(total), f"{stage}: step {done}/{total}, loss {loss}, "
                                                  f"{float(rate):.1f} samples/s")
        elif m := DOWNLOAD.search(line):
            done, total = int(m.group(1)), int(m.group(2))
            self._progress(done, total, f"download: {done} of {total} shards")
        elif m := EVAL.search(line):
            step.facts.update(top1=float(m.group(1)), top5=float(m.group(2)))
        elif m := FILTER.search(line):
            step.facts.update(kept=int(m.group(1)), read=int(m.group(2)))
        elif m := RESUMED.search(line):
            step.facts.update(resumed=int(m.group(2)))

    def _start(self, name: str) -> None:
        name = self.display_names.get(name, name)
        self._step = _Step(name, self.clock())
        self._say(f"[{time.strftime('%H:%M:%S')}] {name} ...")

    def _end(self, name: str, status: str) -> None:
        name = self.display_names.get(name, name)
        step = self._step if self._step and self._step.name == name else _Step(name, self.clock())
        seconds = self.clock() - step.start
        self.steps.append((name, status, seconds, dict(step.facts)))
        when = time.strftime("%H:%M:%S")
        if status == "SUCCESS":
            self._say(f"[{when}] {name} done in {seconds:.1f} s{_facts(step.facts)}")
        else:
            self._say(f"[{when}] {name} {status} after {seconds:.1f} s; its last log lines:")
            for line in step.tail:
                self._say("    " + line.strip()[:200])
        self._step = None

    # ------------------------------------------------------------ console output

    def _progress(self, done: int, total: int, text: str) -> None:
        step = self._step
        if self.tty:
            self.console.write(f"\r           {text} ({100 * done // max(total, 1)}%)\x1b[K")
            self.console.flush()
            self._rate_shown = True
            return
        quarter = 4 * done // max(total, 1)
        if quarter > step.quarter and done < total:
            step.quarter = quarter
            self._say(f"           {text} ({100 * done // max(total, 1)}%)")

    def _say(self, text: str) -> None:
        if self.verbose:
            return  # the full output already went to the console
        if self._rate_shown:
            self.console.write("\r\x1b[K")
            self._rate_shown = False
        self.console.write(text + "\n")
        self.console.flush()


def _facts(facts: dict) -> str:
    """', 40,000 samples, 303.2 samples/s' / ', top-1 62.8%, top-5 99.2%' from what was parsed."""
    parts = [f"resumed from step {facts['resumed']}"] if "resumed" in facts else []
    if "samples" in facts:
        parts += [f"{facts['samples']:,} samples", f"{facts['rate']:.1f} samples/s",
                  f"final loss {facts['loss']}"]
    if "kept" in facts:
        parts.append(f"kept {facts['kept']:,} of {facts['read']:,} samples")
    if "top1" in facts:
        parts.append(f"top-1 {100 * facts['top1']:.1f}%, top-5 {100 * facts['top5']:.1f}%")
    return (": " + ", ".join(parts)) if parts else ""
