# The TPU training image: torch 2.9 + torch_xla 2.9 (torch_xla needs that torch exactly),
# pinned by tests/xla/requirements.txt, the XLA test lane's environment. The project then
# installs with constraints.txt minus its torch / torchvision pins, so every other package
# (kfp included) is at the version the tests use.
#   docker build -f containers/train-tpu.Dockerfile -t REGISTRY/clipa-train-tpu:0.1.0 .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 PJRT_DEVICE=TPU
WORKDIR /opt/clipa
COPY pyproject.toml constraints.txt README.md ./
COPY tests/xla/requirements.txt ./xla-requirements.txt
COPY clipa_model ./clipa_model
COPY components ./components
COPY pipelines ./pipelines
RUN grep -vE '^(torch|torchvision)==' constraints.txt > constraints-tpu.txt \
 && grep -E '^(torch|torch_xla|torchvision)==' xla-requirements.txt > xla-pins.txt \
 && pip install -r xla-pins.txt "torch_xla[tpu]==2.9.0" \
 && pip install -c constraints-tpu.txt -c xla-pins.txt ".[vertex]" \
 && python -c "import torch, torch_xla, kfp, components.train; assert torch.__version__.startswith('2.9')"
