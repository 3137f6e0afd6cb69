"""GRPO and GSPO through verl's own trainer on CPU: verl's own `vanilla` and `gspo` losses (registered by
ctpo.verl_plugin as `verl_vanilla` / `verl_gspo`, which add our `ctpo/*` metrics) in one short run each,
launched as the DAG's train rule does (`python -m ctpo.train`, `train.backend: verl`, `train.verl_device:
cpu`) from the toy SFT warm start.

Each run is the fewest steps that still make a real update that sees moved ratios: one step of 4 prompts x
groups of 4, two mini-batch updates (the second is off-policy), validation and a save. The test asserts that
verl resolved the expected loss mode and aggregation, that its own loss computed the method's clip-active
fraction (verl's `actor/pg_clipfrac` equals our `ctpo/clip_frac_active` of that method on the same tensors),
that the converted metrics.jsonl has the method's metrics, and that the update changed the weights.

Not part of `make test` (each run costs a Ray start-up, about 2-4 min on 2 cores; `make test` runs the same path
once, for CTPO, in test_verl_e2e.py): the module is marked `variant`, which pyproject's addopts deselects;
`make test-variants` (CI) runs it.
CTPO_E2E_WARMSTART=<policy dir> reuses a toy warm start built earlier (saves the SFT minutes).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from hang import HANG_S  # noqa: E402

from ctpo import schema  # noqa: E402
from ctpo.config import load_experiment, resolve_run  # noqa: E402
from ctpo.io import read_json  # noqa: E402
from ctpo.train.verl_metrics import read_verl_log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.verl_e2e_methods, pytest.mark.variant]
# method -> (loss_mode verl must resolve, loss_agg_mode) from configs/methods/{grpo,gspo}.yaml via verl_overrides
EXPECTED = {"grpo": ("verl_vanilla", "seq-mean-token-mean"), "gspo": ("verl_gspo", "seq-mean-token-mean")}


def _run_config(root: Path, method: str) -> dict:
    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    run = f"toy_{method}"
    exp["runs"][run] = {"model": "toy", "method": method}  # toy_verl's DAG trains fewer methods
    d = resolve_run(exp, run, 0)
    d["data"]["train"] = str(root / "data/train.parquet")
    d["data"]["val"] = [str(root / "data/toy_arith.parquet")]
    d["wandb"]["mode"] = "offline"
    d["eval"].update(k=2)
    d["rollout"].update(n=4)
    # one step, two mini-batch updates (the second sees moved ratios), validation and a save at the end
    d["train"].update(prompts_per_step=4, mini_batch_prompts=2, micro_batch_size_per_gpu=4, total_steps=1,
                      save_freq=1, test_freq=1, dump_steps=[])
    return d


@pytest.fixture(scope="module")
def toy(verl_toy):
    """(root, SFT warm-start policy dir): tests/conftest.py's `verl_toy`."""
    return verl_toy


def _train(cfg_path: Path, results: Path, workdir: Path, init: Path, log: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run `python -m ctpo.train` to the end; (exit code, [(seconds since launch, output line)])."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CTPO_PAUSE_AFTER_STEP", None)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctpo.train", "--config", str(cfg_path), "--results", str(results),
         "--workdir", str(workdir), "--init", str(init)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:  # timestamps every line (start-up vs steps), keeps the log for failures
        with open(log, "w") as f:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append((time.monotonic() - t0, line))
                f.write(line + "\n")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=HANG_S)  # a hang guard only
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        rc = proc.wait()
    reader.join(timeout=60)
    return rc, lines


def _first(lines: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


def _weights(state: dict) -> dict:
    import torch

    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", ["grpo", "gspo"])
def test_verl_own_loss_one_step_on_cpu(toy, tmp_path, method):
    import torch
    from transformers import AutoModelForCausalLM

    root, policy = toy
    loss_mode, agg = EXPECTED[method]
    cfg = _run_config(root, method)
    cfg_path = tmp_path / f"toy_{method}.json"
    cfg_path.write_text(json.dumps(cfg))
    wd, res, log = tmp_path / "runs" / f"toy_{method}" / "seed0", tmp_path / "results", tmp_path / "verl.log"

    rc, lines = _train(cfg_path, res, wd, policy, log)
    wall = lines[-1][0] if lines else float("nan")
    assert rc == 0, log.read_text()[-6000:]
    done = read_json(res / "done.json")
    assert done["final_step"] == 1 and done["saved_steps"] == [1] and done["backend"] == "verl"

    # the loss verl used: its own resolved config (printed by main_ppo) names our registered wrapper of
    # verl's loss and the method's aggregation, and the command we built says the same
    text = log.read_text()
    assert re.search(rf"'loss_mode': '{loss_mode}'", text), f"verl did not resolve loss_mode={loss_mode}"
    assert re.search(rf"'loss_agg_mode': '{agg}'", text), f"verl did not resolve loss_agg_mode={agg}"
    cmd = (wd / "verl_logs" / "attempt1.cmd").read_text()
    assert f"policy_loss.loss_mode={loss_mode}" in cmd and "ctpo.verl_plugin.CTPOPolicyLossConfig" not in cmd

    # verl's own loss and our metrics saw the same tensors: verl's pg_clipfrac (clip active, computed by
    # verl's vanilla / gspo) equals our method's ctpo/clip_frac_active, averaged by verl the same way
    raw = read_verl_log(wd / "verl_logs" / "attempt1.jsonl")[1]
    assert "actor/ctpo/clip_frac" in raw, sorted(raw)  # the wrapper (not verl's bare loss) ran
    assert raw["actor/pg_clipfrac"] == pytest.approx(raw["actor/ctpo/clip_frac_active"], abs=1e-6)
    if method == "gspo":  # verl's gspo has no dual clip: it reports 0 for the lower clip fraction
        assert raw["actor/pg_clipfrac_lower"] == 0.0

    # converted metrics.jsonl: one row with the method's metrics
    rows = [json.loads(line) for line in (res / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    r = rows[0]
    for k in (schema.CLIP_FRAC, schema.CLIP_FRAC_LOW, schema.CLIP_FRAC_HIGH, schema.CLIP_FRAC_ACTIVE,
              schema.LOG_RATIO_MEAN, schema.LOG_RHO_CUM_MEAN, schema.LOG_RHO_CUM_STD, schema.REWARD_MEAN,
              schema.ACCURACY, schema.PG_LOSS, schema.GRAD_NORM, schema.STEP_TIME_S):
        assert r[k] is not None and np.isfinite(r[k]), (k, r)
    assert 0.0 <= r[schema.CLIP_FRAC_ACTIVE] <= r[schema.CLIP_FRAC] <= 1.0
    # clip active = low + high (ctpo.losses); out of band (ctpo/clip_frac) counts them and the kept-unclipped
    assert r[schema.CLIP_FRAC_ACTIVE] == pytest.approx(r[schema.CLIP_FRAC_LOW] + r[schema.CLIP_FRAC_HIGH], abs=1e-6)
    assert r[schema.GRAD_NORM] > 0.0  # live advantages: the warm start earns reward in some groups
    assert "val/toy_arith/avg_at_k" in r

    # the update changed the weights (no weight decay: only the gradient moves them)
    shard = torch.load(wd / "checkpoints" / "global_step_1" / "actor" / "model_world_size_1_rank_0.pt",
                       map_location="cpu", weights_only=False)
    trained = _weights(shard)
    initial = _weights(AutoModelForCausalLM.from_pretrained(policy, torch_dtype=torch.float32).state_dict())
    assert set(trained) <= set(initial), sorted(set(trained) - set(initial))
    moved = max((trained[k] - initial[k]).abs().max().item() for k in trained)
    assert moved > 1e-6, f"{method}: the step left every weight unchanged (max |dW| = {moved})"

    # wall time, start-up (launch -> start of step 1: Ray, workers, model load, rollout server) and the step
    ray_up = _first(lines, r"Started a local Ray instance|Ray runtime started")
    step1_logged = _first(lines, r"step:1 - .*timing_s/step:")
    timings = {"wall_s": wall, "ray_up_s": ray_up, "step_s": r[schema.STEP_TIME_S]}
    if step1_logged is not None:
        timings["startup_s"] = step1_logged - r[schema.STEP_TIME_S]
    print(f"verl {method} timings:", json.dumps({k: (round(v, 1) if v is not None else None)
                                                 for k, v in timings.items()}))
