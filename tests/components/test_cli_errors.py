"""``python -m components.<step>``: expected input errors are one line and exit status 2.

Each case gives a file where a folder belongs (model, init, data, filter input, eval set)
or an input that does not exist; the message must name the input and say what was
expected, with no traceback.
"""
import subprocess
import sys

import pytest

from components.cli_errors import run_main
from pipelines.demo_data import write_demo_shards, write_eval_set
from support import REPO_ROOT, make_model_artifact


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a_file").write_text("not a folder")
    return {"file": str(tmp / "a_file"), "tmp": tmp,
            "data": write_demo_shards(str(tmp / "demo"), 16, size=32),
            "model": make_model_artifact(str(tmp / "model")),
            "eval": str(tmp / "eval_set"), "_": write_eval_set(str(tmp / "eval_set"), 1, 0, 32)}


def _cases(i):
    f, out = i["file"], str(i["tmp"] / "out")
    return {
        "train data": ("components.train", [f, out, "--recipe", "smoke"],
                       f"{f}: is a file; expected a folder"),
        "train init": ("components.train", [i["data"], out, "--recipe", "smoke", "--stage",
                                            "finetune_224", "--init", f],
                       f"{f}: is a file; expected a folder"),
        "evaluate model": ("components.evaluate", [f, i["eval"], out],
                           f"{f}: not a model; expected a clipa Model artifact folder"),
        "evaluate eval set": ("components.evaluate", [i["model"], f, out], f"{f}"),
        "filter input": ("components.filter_shard.component", ["--input", f, "--output", out],
                         f"{f}: is a file; expected a folder"),
        "download list": ("components.download.component", ["--url-list", f + ".parquet", "--output", out],
                          f"{f}.parquet: URL list not found"),
    }


@pytest.mark.parametrize("case", ["train data", "train init", "evaluate model",
                                  "evaluate eval set", "filter input", "download list"])
def test_input_errors_are_one_line_naming_the_input(inputs, capsys, case):
    import importlib

    module, argv, message = _cases(inputs)[case]
    main = importlib.import_module(module).main
    assert run_main(main, f"python -m {module}", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m {module}: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "NotADirectoryError" not in err


def test_the_command_line_exits_2_without_a_traceback(inputs):
    module, argv, message = _cases(inputs)["train data"]
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
