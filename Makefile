# Two commands do everything on a fresh machine (Python 3.11):
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic default
#   make test   set up .venv and run the test suite
#   make test-xla   the TPU code path on torch_xla (PJRT_DEVICE=CPU) in a second venv
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch_xla 2.9.0 needs torch 2.9.0 exactly, so the XLA lane has its own venv (under build/,
# which git ignores and `make clean` removes).
XLA_VENV  ?= build/venv-xla
XLA_STAMP := $(XLA_VENV)/.installed

.PHONY: demo test test-xla setup setup-xla compile clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -c constraints.txt -e ".[vertex,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipa run

test: $(STAMP)
	$(PY) -m pytest -q

$(XLA_STAMP): tests/xla/requirements.txt
	test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install -qq --upgrade pip
	$(XLA_VENV)/bin/python -m pip install -qq --no-cache-dir -r tests/xla/requirements.txt
	touch $(XLA_STAMP)

setup-xla: $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/xla

compile: $(STAMP)
	$(VENV)/bin/clipa compile --output pipeline.yaml
	$(VENV)/bin/clipa compile --pipeline eval --output eval_pipeline.yaml

clean:
	rm -rf runs build
