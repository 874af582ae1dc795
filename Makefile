# Two commands do everything on a fresh machine (Python 3.11):
#   make demo   set up .venv and run the whole pipeline on the embedded synthetic default
#   make test   set up .venv and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup compile clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[vertex,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipa run

test: $(STAMP)
	$(PY) -m pytest -q

compile: $(STAMP)
	$(VENV)/bin/clipa compile --output pipeline.yaml

clean:
	rm -rf runs build
