# The data image: download (img2dataset) and filter_shard (Apache Beam), summarize and
# record_history. This repository installed from its pyproject with the exact pins of
# constraints.txt, the same ones the tests install; kfp comes with it, so components run
# with install_kfp_package=False. Build from the repository root (see cloudbuild.yaml):
#   docker build -f containers/data.Dockerfile -t REGISTRY/clipa-data:0.1.0 .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1
WORKDIR /opt/clipa
COPY pyproject.toml constraints.txt README.md ./
COPY clipa_model ./clipa_model
COPY components ./components
COPY pipelines ./pipelines
RUN pip install -c constraints.txt ".[vertex]" \
 && python -c "import kfp, img2dataset, apache_beam, components.filter_shard.component, components.download.component"
