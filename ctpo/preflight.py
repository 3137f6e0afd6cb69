"""GPU preflight: one short job on the slurm profile's GPU partition, before any training, in the GPU environment
on a GPU node.

    python -m ctpo.preflight --plan '<json>' --runs-dir runs/paper --out results/paper/preflight/gpu.json

`--plan` (built by the workflow, ctpo.configure.preflight_plan): {"runs": [{"run", "seed", "config", "keep",
"model_marker"}]}: each GPU run's resolved config, the checkpoint steps its evaluation reads, and its hub model's
fetch marker. Checks, each independent (all are run, all failures reported):

  gpu_stack  torch is a CUDA build and sees a GPU; vllm, verl and flash_attn import
  driver     the NVIDIA driver (`nvidia-smi`) is at least the minimum for torch's CUDA major version
             (MIN_DRIVER: NVIDIA's minor-version-compatibility floor, the driver of the major's first release)
  sandbox    the runs' sandbox isolation works here: a SandboxPool for their rollout settings runs a program
  model      every hub model is in the offline cache at its pinned revision and complete (ctpo.hub.incomplete)
  disk       the file system of --runs-dir has room for what the runs' training and merges will keep
             (ctpo.train.retention's plan: latest checkpoint twice while saving, evaluated steps model-only,
             one merged model per evaluated step), estimated from each model's weight files

Success writes `--out` (what each check saw: versions, driver, isolation mode, bytes needed and free) and prints
one line per check. Failure prints ONE line naming every failed check and exits 78 (EXIT_PERMANENT: the
workflow does not resubmit it, and the trainings that depend on this job never queue).
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from ctpo.exitcodes import fail_permanent
from ctpo.io import write_json

GPU_MODULES = ("vllm", "verl", "flash_attn")
# CUDA major -> minimum Linux driver (NVIDIA, "CUDA Compatibility", minor version compatibility: 13.x >= 580,
# 12.x >= 525; the exact floors are the drivers shipped with 13.0 GA and 12.0 GA)
MIN_DRIVER = {13: (580, 65, 6), 12: (525, 60, 13)}
# bytes kept per byte of bf16 weights (2 bytes per parameter): verl's FSDP actor checkpoint holds fp32 weights
# (4 B/param) + AdamW's two fp32 moments (8 B/param); the merged HF model is bf16 (verl.model_merger)
FULL_CKPT_X, MODEL_ONLY_X, MERGED_X = 6.0, 2.0, 1.0
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class CheckFailed(Exception):
    """One check's failure: the message is a short phrase."""


def _version(tup) -> str:
    return ".".join(f"{x:02d}" if i == 2 else str(x) for i, x in enumerate(tup))


# ----------------------------------------------------------------------------- checks


def check_gpu_stack(import_module=importlib.import_module) -> dict:
    import torch

    seen = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build (no CUDA)")
    elif not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    else:
        seen["gpus"] = torch.cuda.device_count()
        seen["gpu_name"] = torch.cuda.get_device_name(0)
    for name in GPU_MODULES:
        try:
            mod = import_module(name)
            seen[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # ImportError, or a wrong-ABI extension (undefined symbol)
            problems.append(f"{name} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if problems:
        raise CheckFailed("; ".join(problems))
    return seen


def driver_version() -> tuple[int, ...]:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise CheckFailed("nvidia-smi not found (no NVIDIA driver on this node)") from None
    except subprocess.TimeoutExpired:
        raise CheckFailed("nvidia-smi did not answer within 60 s") from None
    line = proc.stdout.strip().splitlines()[0].strip() if proc.stdout.strip() else ""
    if proc.returncode != 0 or not line:
        raise CheckFailed(f"nvidia-smi failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[:200]}")
    try:
        return tuple(int(x) for x in line.split("."))
    except ValueError:
        raise CheckFailed(f"nvidia-smi reported driver version {line!r}") from None


def check_driver() -> dict:
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is a CPU build: no CUDA version to check the driver against")
    major = int(cuda.split(".")[0])
    if major not in MIN_DRIVER:
        raise CheckFailed(f"no minimum driver known for CUDA {cuda} (ctpo.preflight.MIN_DRIVER)")
    have, need = driver_version(), MIN_DRIVER[major]
    if have < need:
        raise CheckFailed(f"NVIDIA driver {_version(have)} is older than {_version(need)}, the minimum for torch "
                          f"{torch.__version__} (CUDA {cuda}); ask for a node with a newer driver")
    return {"driver": _version(have), "min_driver": _version(need), "torch_cuda": cuda}


def check_sandbox(rollouts: list) -> dict:
    from ctpo.sandbox import SandboxPool, SandboxUnavailable

    seen = {}
    for rollout in rollouts:
        try:
            with SandboxPool.for_rollout(rollout) as pool:
                result = pool.run("print(6 * 7)")
                seen = {"isolation": pool.mode, "describe": pool.describe()}
        except SandboxUnavailable as e:
            raise CheckFailed(f"sandbox isolation is not available here: {e}") from None
        if result.status != "ok" or result.stdout.strip() != "42":
            raise CheckFailed(f"a sandboxed test program did not run: status {result.status}, "
                              f"stderr {result.stderr.strip()[-200:]!r}")
    return seen


def check_models(models: dict[str, str | None]) -> dict:
    from ctpo.hub import MissingLocalFiles, require_complete, set_offline

    set_offline()
    seen, problems = {}, []
    for path, revision in sorted(models.items()):
        try:
            seen[path] = str(require_complete(path, revision))
        except MissingLocalFiles as e:
            problems.append(str(e))
    if problems:
        raise CheckFailed("; ".join(problems))
    return seen


def weights_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def run_disk_need(weights: int, keep: list[int], total_steps: int) -> int:
    """Peak bytes one run keeps under ctpo.train.retention: two full checkpoints while the newest is saved
    (the previous one is pruned after), the model part of every earlier evaluated step, one merged model per
    evaluated step."""
    earlier = [s for s in keep if s < total_steps]
    return int(weights * (2 * FULL_CKPT_X + len(earlier) * MODEL_ONLY_X + len(keep) * MERGED_X))


def check_disk(runs: list[dict], model_dirs: dict[str, str], runs_dir: str | Path) -> dict:
    need = {}
    for r in runs:
        w = weights_bytes(model_dirs[r["model_path"]])
        need[f"{r['run']} seed {r['seed']}"] = run_disk_need(w, r["keep"], r["total_steps"])
    target = Path(runs_dir).resolve()
    where = next(p for p in (target, *target.parents) if p.exists())  # runs/ may not exist yet: its file system
    free = shutil.disk_usage(where).free
    total = sum(need.values())
    if free < total:
        raise CheckFailed(f"{target} has {free / 1e9:.0f} GB free, training keeps up to {total / 1e9:.0f} GB "
                          f"({', '.join(f'{k} {v / 1e9:.0f} GB' for k, v in sorted(need.items()))}); free space or "
                          f"point runs/ at a larger file system (a quota below df's free space is not seen here)")
    return {"free_bytes": free, "need_bytes": total, "per_run": need}


# ----------------------------------------------------------------------------- driver


def load_plan(plan: dict) -> list[dict]:
    from ctpo.config import load_run_config

    runs = []
    for item in plan["runs"]:
        cfg = load_run_config(item["config"])
        runs.append({"run": cfg.run, "seed": cfg.seed, "cfg": cfg, "keep": list(item["keep"]),
                     "total_steps": cfg.train.total_steps, "model_path": cfg.model.path,
                     "revision": cfg.model.revision})
    return runs


def run_checks(runs: list[dict], runs_dir: str | Path) -> tuple[dict, dict]:
    """(results of the checks that passed, {check: failure phrase})."""
    ok, failed = {}, {}
    hub_runs = [r for r in runs if r["cfg"].model.kind == "hf"]
    models = {r["model_path"]: r["revision"] for r in hub_runs}
    steps = {
        "gpu_stack": check_gpu_stack,
        "driver": check_driver,
        "sandbox": lambda: check_sandbox([r["cfg"].rollout for r in runs]),
        "model": lambda: check_models(models),
    }
    for name, fn in steps.items():
        try:
            ok[name] = fn()
        except CheckFailed as e:
            failed[name] = str(e)
    if "model" in ok:
        try:
            ok["disk"] = check_disk(hub_runs, ok["model"], runs_dir)
        except CheckFailed as e:
            failed["disk"] = str(e)
    else:
        failed["disk"] = "not checked (needs the model's weight files)"
    return ok, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.preflight", description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="JSON: {runs: [{config, keep}]} (ctpo.configure.preflight_plan)")
    ap.add_argument("--runs-dir", required=True, help="where the runs' work directories live (runs/<exp>)")
    ap.add_argument("--out", required=True, help="report JSON, written only when every check passed")
    args = ap.parse_args(argv)
    host = socket.gethostname()
    try:
        runs = load_plan(json.loads(args.plan))
    except Exception as e:  # a bad plan is the workflow's bug or a bad config: no retry fixes it
        fail_permanent(f"preflight on {host}: bad --plan ({type(e).__name__}: {e})")
    ok, failed = run_checks(runs, args.runs_dir)
    if failed:
        fail_permanent(f"preflight failed on {host}: " + " | ".join(f"{k}: {v}" for k, v in failed.items()))
    for name, seen in ok.items():
        print(f"preflight {name}: ok {json.dumps(seen, sort_keys=True, default=str)}", flush=True)
    write_json(args.out, {"host": host, "python": sys.executable, "checks": ok})
    return 0


if __name__ == "__main__":
    sys.exit(main())
