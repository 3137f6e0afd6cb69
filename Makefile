# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing; a second run reinstalls nothing unless pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: demo demo-seeds test test-variants venv slurm-profile bench clean-demo pins resolve-gpu

venv: $(STAMP)

$(STAMP): pyproject.toml
	@/sbin/ldconfig -p | grep -q 'libseccomp\.so\.2' || { echo "the sandbox's syscall filter needs libseccomp.so.2: apt-get install libseccomp2"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing into $(VENV) (torch==2.13.0 CPU wheel first, so nothing pulls a CUDA build)"
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,dev,workflow]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ctpo.demo --jobs $(JOBS)

# The toy with 3 training seeds: tables show the across-seed mean and Student-t CI (about 3x the demo's time).
demo-seeds: $(STAMP)
	$(PY) -m ctpo.demo --jobs $(JOBS) --seeds 0 1 2

# Two pytest-xdist workers (TEST_WORKERS=0 runs in one process); tests/conftest.py makes each test file one unit of
# work (the files sharing the toy warm start one unit) and hands out the longest units first.
TEST_WORKERS ?= 2
PYTEST := WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) tests

# The other methods and signals of the end-to-end paths `make test` runs once (marker `variant`): GRPO, GSPO and
# CTPO-fixed through the local trainer and through verl's own trainer on CPU, SIGUSR1 preemption. CI runs it
# after `make test`.
test-variants: $(STAMP)
	$(PYTEST) -m variant tests

# envs/cpu.yaml, envs/gpu.yaml, envs/gpu.post-deploy.sh from pyproject.toml (the one pin set).
pins:
	$(PYTHON) envs/pins.py render

# pip's real resolver, dry run, on both documented GPU installs (conda env's pip section and
# `pip install -e '.[gpu,jobs]'`), in a throwaway venv under build/pins with pip 25.2. Reads only package
# metadata (nothing is installed); prints each resolution's time and torch/transformers/vllm versions.
resolve-gpu:
	$(PYTHON) envs/pins.py resolve --out build/pins

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Installs the `slurm` global profile where Snakemake looks for it (~/.config/snakemake/slurm). An existing,
# different profile is kept: the script refuses unless FORCE=1 (which backs it up); NAME=<n> installs beside it.
slurm-profile:
	@test -n "$(ACCOUNT)" -a -n "$(PARTITION)" -a -n "$(CPU_PARTITION)" || { echo "usage: make slurm-profile ACCOUNT=<acct> PARTITION=<gpu part> CPU_PARTITION=<cpu part> [NAME=slurm] [FORCE=1]"; exit 2; }
	$(PYTHON) workflow/scripts/install_slurm_profile.py --account "$(ACCOUNT)" --partition "$(PARTITION)" \
		--cpu-partition "$(CPU_PARTITION)" --name "$(or $(NAME),slurm)" $(if $(FORCE),--force)

clean-demo:
	rm -rf results/toy figures/toy runs/toy logs/toy .snakemake
