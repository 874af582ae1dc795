# The training image (CUDA): pretrain, finetune, evaluate and benchmark on NVIDIA GPUs.
# torch from PyPI's Linux wheel, which bundles the CUDA runtime (the host supplies the
# driver); the pin is constraints.txt's, the one the tests run. kfp comes with the project.
#   docker build -f containers/train.Dockerfile -t REGISTRY/clipa-train:0.1.0 .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1
WORKDIR /opt/clipa
COPY pyproject.toml constraints.txt README.md ./
COPY clipa_model ./clipa_model
COPY components ./components
COPY pipelines ./pipelines
RUN pip install -c constraints.txt ".[vertex]" \
 && python -c "import torch, kfp, components.train; assert torch.version.cuda, 'torch is not a CUDA build'"
