# iteravg: every target sets up what it needs first (idempotent, seconds when already done).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.iteravg-stamps/ready
NP    ?= 2

export OMPI_ALLOW_RUN_AS_ROOT ?= 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM ?= 1
export OMPI_MCA_rmaps_base_oversubscribe ?= 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test test-fast fuzz demo bench docs soak study clean image test-hosts

setup: $(STAMP)
$(STAMP): scripts/install.sh requirements/base.txt requirements/dev.txt requirements/study.txt requirements/torch.txt requirements/lightning.txt pyproject.toml setup.py src/iteravg/core/_foldkernel.c src/iteravg/mx/_ndkernel.c
	bash scripts/install.sh $(VENV)
	@touch $@

## The whole test suite: unit, differential, GluonTS trainer, multi-rank jobs, end-to-end, docs build.
test: setup
	$(PY) -m pytest -q -rs

## Single-process tests only (no horovodrun / mpirun jobs).
test-fast: setup
	$(PY) -m pytest -q -m "not multirank"

## Fuzz the checkpoint readers (hypothesis): 50,000 mutated safetensors headers, 50,000 mutated state records and
## 5,000 mutated snapshot directories, random seeds (make test runs a fixed 120/120/30 of them).
fuzz: setup
	ITERAVG_FUZZ_EXAMPLES=50000 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz_checkpoints.py

## The main job: 2-rank data-parallel training with synchronised averaging on the embedded data set, then every
## averaging start it could have taken, evaluated after training (post-hoc averaging windows).
demo: setup
	bash launch/horovodrun-local.sh $(NP) --out runs/demo --posthoc
	$(VENV)/bin/iteravg posthoc runs/demo

## The container image (podman, no registry needed; ENGINE=docker for docker), cached by a content hash.
image:
	bash scripts/image.sh

## Multi-host jobs and faults across 3 containers (docker/README.md); HOSTS_ONLY=name,... for a subset.
test-hosts:
	set -o pipefail; image=$$(bash scripts/image.sh | tail -n 1) && python3 tests/hosts/suite.py "$$image"

bench: setup
	$(PY) benchmarks/bench_update.py
	$(PY) benchmarks/bench_posthoc.py
	$(PY) benchmarks/bench_watchdog.py
	bash launch/horovodrun-local.sh 2 --bench-sync
	$(PY) benchmarks/bench_torch.py
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 benchmarks/bench_torch.py --sync
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_lightning.py

docs: setup
	$(PY) -m mkdocs build --strict -d site

soak: setup
	$(PY) tests/soak.py

## What averaging buys on real series across seeds: trains the runs not cached in runs/study, then rewrites
## docs/results.md and docs/study/ (about 90 minutes on 2 cores from scratch; seconds when all are cached).
study: setup
	$(PY) studies/averaging_study.py

clean:
	rm -rf $(VENV) site build src/*.egg-info runs
