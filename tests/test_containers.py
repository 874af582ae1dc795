"""Container images and Cloud Build: parsed for what they must hold (no Docker engine here)."""
import os
import re
import tomllib

import yaml

from pipelines.placement import PLACEMENTS
from support import REPO_ROOT

DOCKERFILES = {"clipa-data": "containers/data.Dockerfile", "clipa-train": "containers/train.Dockerfile",
               "clipa-train-tpu": "containers/train-tpu.Dockerfile"}


def _read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path)) as f:
        return f.read()


def _instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", _read(path))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _pyproject() -> dict:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_each_image_is_python_311_with_the_pinned_project_and_kfp():
    project = _pyproject()
    extras = set(project["project"]["optional-dependencies"])
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for name, path in DOCKERFILES.items():
        ins = _instructions(path)
        assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11"), (path, ins[0])
        copied = " ".join(args for word, args in ins if word == "COPY")
        for needed in ("pyproject.toml", "constraints.txt", "README.md", *packages):
            assert needed in copied, (path, needed)
        run = " ".join(args for word, args in ins if word == "RUN")
        m = re.search(r"pip install -c (constraints(?:-tpu)?\.txt)(?: -c \S+)* \"\.\[([a-z,]+)\]\"", run)
        assert m, f"{path}: no pip install of the project with the constraints"
        assert set(m.group(2).split(",")) <= extras, path
        assert any(d.startswith("kfp") for d in project["project"]["dependencies"])  # kfp comes with it
        assert re.search(r"python -c \"import [^\"]*\bkfp\b", run), f"{path}: no import check of kfp"


def test_train_image_checks_for_a_cuda_torch():
    run = " ".join(a for w, a in _instructions(DOCKERFILES["clipa-train"]) if w == "RUN")
    assert "torch.version.cuda" in run


def test_tpu_image_uses_the_xla_lane_pins():
    run = " ".join(a for w, a in _instructions(DOCKERFILES["clipa-train-tpu"]) if w == "RUN")
    pins = dict(line.split("==") for line in _read("tests/xla/requirements.txt").splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"].startswith("2.9") and pins["torch_xla"].startswith("2.9")
    assert f'"torch_xla[tpu]=={pins["torch_xla"]}"' in run
    assert "tests/xla/requirements.txt" in " ".join(a for w, a in _instructions(DOCKERFILES["clipa-train-tpu"])
                                                    if w == "COPY")
    # The main environment's torch pin would fight torch_xla: it is dropped for this image.
    assert "grep -vE '^(torch|torchvision)==' constraints.txt > constraints-tpu.txt" in run


def test_cloud_build_builds_and_pushes_every_image_the_placements_use():
    build = yaml.safe_load(_read("cloudbuild.yaml"))
    tags = {}
    for step in build["steps"]:
        args = step["args"]
        assert args[0] == "build" and args[-1] == "."
        dockerfile, tag = args[args.index("-f") + 1], args[args.index("-t") + 1]
        assert os.path.exists(os.path.join(REPO_ROOT, dockerfile)), dockerfile
        tags[tag.split("/")[-1].split(":")[0]] = (dockerfile, tag)
    assert {k: v[0] for k, v in tags.items()} == DOCKERFILES
    assert sorted(build["images"]) == sorted(tag for _, tag in tags.values())
    used = {img.rsplit("/", 1)[-1].split(":")[0] for p in PLACEMENTS.values()
            for img in (p.data_image, p.train_image)}
    assert used <= set(DOCKERFILES)


def test_docker_context_leaves_out_the_venv():
    ignored = _read(".dockerignore").split()
    assert ".venv" in ignored and ".git" in ignored
