"""The console view of `clipa run`: a line per step, progress, failures; everything in the log."""
import io
import logging

from pipelines.console import LiveView


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _train_lines(stage: str, total: int) -> list[str]:
    """Progress lines as clipa_model/train_loop.py logs them (same format string)."""
    logger = logging.getLogger("test-console")
    out = []
    for step in range(1, total + 1):
        record = logger.makeRecord("x", logging.INFO, "f", 1,
                                   "%s step %d/%d samples %d loss %.4f lr %.2e T %.4f %.1f samples/s%s",
                                   (stage, step, total, 32 * step, 4.0 - step / 10, 1e-4, 0.07, 250.0, ""),
                                   None)
        out.append(f"    [KFP Executor 2026-01-01 00:00:00,000 INFO]: {record.getMessage()}\n")
    return out


def _kfp_task(name: str, body: list[str], status: str = "SUCCESS") -> str:
    """A task as kfp.local prints it: colour codes, executor input JSON, streamed logs."""
    return "".join([f"00:00:00.000 - INFO - Executing task \x1b[96m'{name}'\x1b[0m\n",
                    "00:00:00.000 - INFO - Streamed logs:\n", '    {\n', '        "executor_input": 1\n',
                    '    }\n', *body,
                    f"00:00:01.000 - INFO - Task \x1b[96m'{name}'\x1b[0m finished with status "
                    f"\x1b[92m{status}\x1b[0m\n"])


def test_pipe_console_gets_one_line_per_step_and_quarter_progress():
    log, console = io.StringIO(), io.StringIO()
    view = LiveView(log, console)
    view.display_names = {"finetune-2": "finetune-336"}
    text = _kfp_task("finetune-2", _train_lines("finetune_336", 40))
    for i in range(0, len(text), 37):  # kfp.local writes in arbitrary pieces
        view.write(text[i:i + 37])
    lines = console.getvalue().splitlines()
    assert lines[0].endswith("finetune-336 ...")
    assert [l for l in lines if "%)" in l] == [l for l in lines[1:4]]      # 25, 50, 75%
    assert "step 10/40" in lines[1] and "(25%)" in lines[1] and "250.0 samples/s" in lines[1]
    assert "finetune-336 done in" in lines[4] and "1,280 samples" in lines[4] and "final loss 0.0000" in lines[4]
    assert len(lines) == 5
    assert log.getvalue() == text                    # the full output, unchanged
    assert "executor_input" not in console.getvalue()
    assert view.steps[0][:2] == ("finetune-336", "SUCCESS")


def test_terminal_progress_is_rewritten_in_place():
    console = _Terminal()
    view = LiveView(io.StringIO(), console)
    view.write(_kfp_task("pretrain", _train_lines("pretrain", 8)))
    out = console.getvalue()
    assert out.count("\r") >= 8 and "step 8/8" in out
    assert len(out.split("\n")) == 3                 # start line, done line, trailing newline


def test_a_failed_step_shows_its_last_log_lines():
    console = io.StringIO()
    view = LiveView(io.StringIO(), console)
    body = [f"    line {i}\n" for i in range(40)] + ["    ConfigError: StageConfig.lr=-1.0: expected positive\n"]
    view.write(_kfp_task("pretrain", body, status="FAILURE"))
    out = console.getvalue()
    assert "pretrain FAILURE after" in out
    assert "ConfigError: StageConfig.lr=-1.0" in out
    assert "line 39" in out and "line 0\n" not in out   # the tail, not the whole log


def test_evaluation_and_filter_results_reach_the_step_line():
    console = io.StringIO()
    view = LiveView(io.StringIO(), console)
    view.write(_kfp_task("evaluate", ["    INFO: finetune_336: top1 0.628 top5 0.992 colour baseline 0.1\n"]))
    view.write(_kfp_task("filter-shard", ["    filter_shard: kept 3,000 of 4,000 samples\n".replace(",", "")]))
    out = console.getvalue()
    assert "top-1 62.8%, top-5 99.2%" in out
    assert "kept 3,000 of 4,000 samples" in out


def test_verbose_passes_everything_through():
    console = io.StringIO()
    view = LiveView(io.StringIO(), console, verbose=True)
    text = _kfp_task("pretrain", _train_lines("pretrain", 4))
    view.write(text)
    assert console.getvalue() == text


def test_a_resumed_stage_says_from_which_step():
    console = io.StringIO()
    view = LiveView(io.StringIO(), console)
    body = ["    [KFP Executor] pretrain: resumed from step 4 (/w/checkpoints/pretrain-ab12)\n",
            *_train_lines("pretrain", 8)[4:]]
    view.write(_kfp_task("pretrain", body))
    assert "pretrain done in" in console.getvalue() and "resumed from step 4" in console.getvalue()
