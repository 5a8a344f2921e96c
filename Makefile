# make demo: set up .venv if missing, then run the main job.  make test: the test suite.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SHARED_CORPUS := $(abspath ../shared/data/tinyshakespeare/input.txt)

# the corpus is found through PICOGPT_DATA when a local copy sits beside the repo;
# otherwise the data-source chain falls back to the cache, then the download
ifeq ($(origin PICOGPT_DATA), undefined)
ifneq ($(wildcard $(SHARED_CORPUS)),)
export PICOGPT_DATA := $(SHARED_CORPUS)
endif
endif

.PHONY: demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m picogpt_lightning pipeline

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
