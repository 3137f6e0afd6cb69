"""The verl launcher: the composed verl config carries the paper's setup; metrics / dump conversion;
W&B id stability; done only by step count; signal forwarding; print-command and merge commands."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ctpo import schema
from ctpo.config import load_experiment, load_run_config, resolve_run
from ctpo.train import verl_backend as vb
from ctpo.train import verl_command as vc
from ctpo.diagnostics.verl_dumps import DumpError, DumpWriter, convert_dumps, writer_from_env
from ctpo.train.verl_metrics import convert_logs
from hang import HANG_S

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent
PAPER = load_experiment(ROOT / "configs" / "experiments" / "paper.yaml")
RUNS = {"grpo": "qwen3_4b_grpo", "gspo": "qwen3_4b_gspo", "ctpo": "qwen3_4b_ctpo", "ctpo_fixed": "qwen3_14b_ctpo_fixed"}


def _cfg(method: str, seed: int = 0):
    return load_run_config(resolve_run(PAPER, RUNS[method], seed))


def verl_argv(cfg, workdir, init=None) -> list[str]:
    """argv of the run's next verl launch, as `--print-command` shows it (ctpo.train.verl_command)."""
    return vc.verl_command(cfg, workdir, vb.launch_state(cfg, workdir, record=False), init)[0]


def _compose(overrides: list[str]):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """method -> (RunConfig, composed verl DictConfig, workdir) for the four paper methods."""
    out = {}
    for method in RUNS:
        cfg = _cfg(method)
        wd = tmp_path_factory.mktemp(method) / "runs" / "paper" / RUNS[method] / "seed0"
        argv = verl_argv(cfg, wd)
        assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
        out[method] = (cfg, _compose(argv[3:]), wd)
    return out


# the paper's values, written out here independently of configs/ (paper Sec. 4.1 + authors' launcher)
PAPER_LOSS = {
    "grpo": {"loss_mode": "verl_vanilla", "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
             "loss_agg_mode": "seq-mean-token-mean"},  # the release's effective averaging (test_release_objective)
    "gspo": {"loss_mode": "verl_gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"},
    "ctpo": {"loss_mode": "ctpo", "eps_low": 0.025, "eps_high": 0.05, "power": 0.5, "fixed_bounds": None,
             "dual_clip_c": 0.05, "loss_agg_mode": "seq-mean-token-mean"},
    "ctpo_fixed": {"loss_mode": "ctpo_fixed", "fixed_bounds": [0.5, 5.0], "dual_clip_c": None, "fixed_dual_clip": 5.0,
                   "loss_agg_mode": "seq-mean-token-mean"},
}


@pytest.mark.parametrize("method", list(RUNS))
def test_composed_verl_config_has_the_paper_setup(composed, method):
    cfg, c, wd = composed[method]
    a, ro, d, t, alg = c.actor_rollout_ref.actor, c.actor_rollout_ref.rollout, c.data, c.trainer, c.algorithm
    model = "Qwen/Qwen3-14B" if "14b" in RUNS[method] else "Qwen/Qwen3-4B"
    assert c.actor_rollout_ref.model.path == model
    assert c.actor_rollout_ref.model.external_lib == "ctpo.verl_plugin"
    assert d.train_files == str((ROOT / "data/deepscaler/train.parquet").resolve())
    assert list(d.val_files) == [str(ROOT / f"data/benchmarks/{b}.parquet") for b in ("aime25", "aime26")]
    assert (d.train_batch_size, ro.n, a.ppo_mini_batch_size, a.ppo_micro_batch_size_per_gpu) == (512, 8, 32, 1)
    assert (d.max_prompt_length, d.max_response_length) == (16000, 8000)
    assert d.filter_overlong_prompts is True and d.truncation == "error"
    assert d.apply_chat_template_kwargs.enable_thinking is False
    assert a.optim.lr == pytest.approx(1e-6) and a.optim.lr_scheduler_type == "constant"
    assert a.optim.lr_warmup_steps_ratio == 0.0 and a.optim.clip_grad == 1.0 and a.grad_clip == 1.0
    assert a.use_kl_loss is False and a.kl_loss_coef == 0.0 and a.entropy_coeff == 0.0
    assert alg.use_kl_in_reward is False and alg.adv_estimator == "grpo" and alg.norm_adv_by_std_in_grpo is True
    assert a.fsdp_config.param_offload is True and a.fsdp_config.optimizer_offload is True
    assert (ro.name, ro.mode, ro.tensor_model_parallel_size) == ("vllm", "async", 1)
    assert ro.gpu_memory_utilization == 0.6 and ro.calculate_log_probs is True
    assert ro.max_num_seqs == 1024  # the release (verl 0.9.1 defaults to 256)
    assert ro.checkpoint_engine.update_weights_bucket_megabytes == 4096
    assert ro.multi_turn.enable is True
    assert (ro.multi_turn.max_assistant_turns, ro.multi_turn.max_user_turns) == (5, 5)
    # the release's tool protocol (rollout.protocol: release in paper.yaml)
    assert ro.multi_turn.tool_config_path == str(ROOT / "configs/verl/release_tool_config.yaml")
    assert ro.agent.agent_loop_config_path == str(wd.resolve() / "verl" / "agent_loop.yaml")
    assert ro.agent.default_agent_loop == "ctpo_release" and ro.multi_turn.format == "hermes_fallback"
    assert (ro.multi_turn.max_parallel_calls, ro.multi_turn.max_tool_response_length) == (1, 256)
    assert ro.multi_turn.tool_response_truncate_side == "middle"
    assert (ro.val_kwargs.n, ro.val_kwargs.temperature, ro.val_kwargs.top_p, ro.val_kwargs.do_sample) == (32, 0.7, 1.0, True)
    rc = alg.rollout_correction  # what the trainer reads (decoupled mode, bypass off)
    assert (rc.rollout_is, rc.rollout_is_threshold, rc.rollout_is_batch_normalize, rc.bypass_mode) == (
        "sequence", 5.0, False, False)
    assert c.reward.custom_reward_function.path == "pkg://ctpo.release_reward"  # the release's grader
    assert c.reward.custom_reward_function.name == "compute_score"
    assert (t.nnodes, t.n_gpus_per_node, t.total_training_steps) == (1, 8, 305)
    assert (t.save_freq, t.test_freq, t.val_before_train, t.resume_mode) == (20, 20, False, "auto")
    assert t.default_local_dir == str((wd / "checkpoints").resolve())
    assert "console" in t.logger and "file" in t.logger
    assert t.experiment_name == f"{RUNS[method]}-seed0" and t.project_name == "ctpo-repro"
    ray_tmp = c.ray_kwargs.ray_init._temp_dir
    assert len(ray_tmp) <= 32 and c.ray_kwargs.ray_init.include_dashboard is False
    # loss: on the composed config and on the dataclass verl's workers build from it
    from verl.utils.config import omega_conf_to_dataclass

    actor = omega_conf_to_dataclass(a)
    for key, want in PAPER_LOSS[method].items():
        if key == "loss_agg_mode":
            assert actor.loss_agg_mode == want
        elif key in ("clip_ratio_low", "clip_ratio_high"):
            assert getattr(actor, key) == pytest.approx(want)
        else:
            got = getattr(actor.policy_loss, key)
            if got is not None and not isinstance(got, (str, int, float)):
                got = [float(x) for x in got]
            assert got == want, key


@pytest.mark.parametrize("method", ["grpo", "ctpo"])
def test_composed_config_passes_verl_validation(composed, method):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    _, c, _ = composed[method]
    assert not need_reference_policy(c) and not need_critic(c)  # no KL: no reference model; GRPO: no critic
    validate_config(c, use_reference_policy=False, use_critic=False)


def test_typo_in_an_override_fails_composition():
    from hydra.errors import ConfigCompositionException

    argv = verl_argv(_cfg("ctpo"), "/tmp/w")
    with pytest.raises(ConfigCompositionException):
        _compose([*argv[3:], "actor_rollout_ref.actor.ppo_mini_batchsize=32"])


def test_seed_and_norm_adv_follow_the_run_config():
    d = resolve_run(PAPER, "qwen3_4b_grpo", 3)
    d["train"]["norm_adv_by_std"] = False
    c = _compose(verl_argv(load_run_config(d), "/tmp/w")[3:])
    assert c.data.seed == 3 and c.actor_rollout_ref.rollout.seed == 3
    assert c.algorithm.norm_adv_by_std_in_grpo is False


def test_print_command_is_one_override_per_line_and_round_trips(capsys, tmp_path):
    cfg = _cfg("ctpo")
    assert vb.main(cfg, tmp_path / "r", tmp_path / "w", print_command=True) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split(" \\\n    ")
    argv, env = vc.verl_command(cfg, tmp_path / "w", vb.launch_state(cfg, tmp_path / "w", record=False))
    assert len(lines) == len(env) + len(argv) - 2  # VAR=value lines, then python -m verl.trainer.main_ppo, overrides
    words = shlex.split(out.replace("\\\n", " "))
    assert words[:len(env)] == [f"{k}={v}" for k, v in sorted(env.items())] and words[len(env):] == argv
    assert env["CTPO_DUMP_CALLS_PER_STEP"] == str(512 * 8 // 8) and env["HF_HUB_OFFLINE"] == "1"
    assert not (tmp_path / "w").exists()  # printing creates nothing


def test_train_cli_prints_the_same_command(tmp_path):
    """`python -m ctpo.train --print-command`: the one CLI that prints the verl command."""
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(resolve_run(PAPER, "qwen3_4b_gspo", 0)))
    res = subprocess.run(
        [sys.executable, "-m", "ctpo.train", "--print-command", "--config", str(cfg_path),
         "--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "w"), "--keep-steps", "300", "305"],
        capture_output=True, text=True, cwd=ROOT, timeout=HANG_S, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert res.returncode == 0, res.stderr
    words = shlex.split(res.stdout.replace("\\\n", " "))
    argv = words[words.index(sys.executable):]
    assert argv == verl_argv(load_run_config(str(cfg_path)), tmp_path / "w")
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=verl_gspo" in argv
    assert "CTPO_KEEP_STEPS=300,305" in words[:words.index(sys.executable)]


def test_wandb_run_id_is_deterministic_stored_and_reused(tmp_path):
    cfg = _cfg("ctpo", seed=1)
    from ctpo.tracking import wandb_run_id
    from ctpo.workdir import run_identity

    identity = run_identity(dataclasses.asdict(cfg))[0]  # a changed config is a new W&B run
    want = hashlib.sha256(f"paper/qwen3_4b_ctpo/seed1/{identity}".encode()).hexdigest()[:16]
    assert wandb_run_id(dataclasses.asdict(cfg), tmp_path / "a") == want
    assert (tmp_path / "a" / "wandb_run_id").read_text().strip() == want
    assert wandb_run_id(dataclasses.asdict(cfg), tmp_path / "b") == want  # a fresh workdir derives the same id
    (tmp_path / "a" / "wandb_run_id").write_text("kept-from-before\n")  # a stored id always wins
    launch = dataclasses.replace(vb.launch_state(cfg, tmp_path / "a"), attempt=2)
    _, env = vc.verl_command(cfg, tmp_path / "a", launch, base_env={
        "RAY_ADDRESS": "10.0.0.1:6379", "WANDB_MODE": "offline", "WANDB_SERVICE": "2-123-unix-/tmp/parent.sock"})
    assert env["WANDB_RUN_ID"] == "kept-from-before" and env["WANDB_RESUME"] == "allow"
    assert env["WANDB_RUN_GROUP"] == f"paper/{cfg.model.name}/ctpo" and "RAY_ADDRESS" not in env
    assert "WANDB_SERVICE" not in env  # verl starts its own W&B service, never the launcher's parent's
    assert env["VERL_FILE_LOGGER_PATH"].endswith("verl_logs/attempt2.jsonl")
    assert env["CTPO_DUMP_STEPS"] == "50,100,150"
    assert env["CTPO_DUMP_START_STEP"] == "1" and env["CTPO_DUMP_CALLS_PER_STEP"] == str(512 * 8 // 8)
    _fake_checkpoints(tmp_path / "a", [40], latest=40)
    assert vc.verl_command(cfg, tmp_path / "a", vb.launch_state(cfg, tmp_path / "a"))[1]["CTPO_DUMP_START_STEP"] == "41"


# train.verl key -> (a changed value, where it lands in the composed verl config)
VERL_KEYS = {
    "ppo_epochs": (2, "actor_rollout_ref.actor.ppo_epochs"),
    "lr_scheduler": ("cosine", "actor_rollout_ref.actor.optim.lr_scheduler_type"),
    "lr_warmup_steps_ratio": (0.1, "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio"),
    "kl_loss_coef": (0.001, "actor_rollout_ref.actor.kl_loss_coef"),
    "entropy_coeff": (0.01, "actor_rollout_ref.actor.entropy_coeff"),
    "param_offload": (False, "actor_rollout_ref.actor.fsdp_config.param_offload"),
    "optimizer_offload": (False, "actor_rollout_ref.actor.fsdp_config.optimizer_offload"),
    "use_remove_padding": (False, "actor_rollout_ref.model.use_remove_padding"),
    "gradient_checkpointing": (False, "actor_rollout_ref.model.enable_gradient_checkpointing"),
    "rollout_tp": (2, "actor_rollout_ref.rollout.tensor_model_parallel_size"),
    "gpu_memory_utilization": (0.5, "actor_rollout_ref.rollout.gpu_memory_utilization"),
    "weight_sync_bucket_mb": (2048, "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes"),
    "filter_overlong_prompts": (False, "data.filter_overlong_prompts"),
    "truncation": ("left", "data.truncation"),
    "val_before_train": (True, "trainer.val_before_train"),
}


def test_every_verl_setting_is_a_config_key_in_the_run_identity_and_the_command(tmp_path):
    """Each train.verl key reaches verl's composed config, is printed by --print-command and changes the run
    identity; the release's values are the ones paper.yaml states (written out here independently)."""
    from omegaconf import OmegaConf

    from ctpo.config import VerlConfig
    from ctpo.workdir import run_identity

    assert set(VERL_KEYS) == {f.name for f in dataclasses.fields(VerlConfig)}
    base = resolve_run(PAPER, "qwen3_4b_ctpo", 0)
    assert base["train"]["verl"] == {
        "ppo_epochs": 1, "lr_scheduler": "constant", "lr_warmup_steps_ratio": 0.0, "kl_loss_coef": 0.0,
        "entropy_coeff": 0.0, "param_offload": True, "optimizer_offload": True, "use_remove_padding": True,
        "gradient_checkpointing": True, "rollout_tp": 1, "gpu_memory_utilization": 0.6, "weight_sync_bucket_mb": 4096,
        "filter_overlong_prompts": True, "truncation": "error", "val_before_train": False}
    base_argv = verl_argv(load_run_config(base), "/tmp/w")
    changed = {}
    for key, (value, _) in VERL_KEYS.items():
        d = resolve_run(PAPER, "qwen3_4b_ctpo", 0)
        d["train"]["verl"][key] = value
        cfg = load_run_config(d)
        assert run_identity(d)[0] != run_identity(base)[0], key
        argv = verl_argv(cfg, "/tmp/w")
        assert len(argv) == len(base_argv) and argv != base_argv, key
        changed.update(a.split("=", 1) for a in set(argv) - set(base_argv))
    c = _compose([f"{k}={v}" if k not in changed else f"{k}={changed[k]}" for k, v in
                  (a.split("=", 1) for a in base_argv[3:])])
    for key, (value, path) in VERL_KEYS.items():
        assert OmegaConf.select(c, path) == value, key
    assert c.actor_rollout_ref.actor.use_kl_loss is True  # kl_loss_coef > 0 turns the KL loss on
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    assert need_reference_policy(c)  # ... with a reference model, configured well enough for verl's checks
    validate_config(c, use_reference_policy=True, use_critic=need_critic(c))
    d = resolve_run(PAPER, "qwen3_4b_ctpo", 0)
    d["train"]["verl"].update(ppo_epochs=2)
    assert vc.loss_calls_per_step(load_run_config(d)) == 2 * vc.loss_calls_per_step(load_run_config(base))


def test_verl_settings_have_no_defaults_and_fail_in_one_line(tmp_path, capsys):
    from ctpo.config import ConfigError
    from ctpo.exitcodes import EXIT_PERMANENT  # a config error: the workflow does not resubmit it

    d = resolve_run(PAPER, "qwen3_4b_ctpo", 0)
    del d["train"]["verl"]["gpu_memory_utilization"]
    with pytest.raises(ConfigError, match=r"train\.verl\.gpu_memory_utilization: required, no default"):
        load_run_config(d)
    d["train"]["verl"] = None
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert vb.cli(["run", "--config", str(tmp_path / "c.json"), "--results", "r", "--workdir", "w"]) == EXIT_PERMANENT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.verl (the verl launcher's settings" in err[0] and "required" in err[0]


def test_a_changed_verl_setting_sets_old_checkpoints_aside(tmp_path, capsys):
    """The launcher claims its workdir with the run identity: a run whose gpu_memory_utilization changed
    starts from scratch and its old checkpoints move to superseded/ (verl would otherwise resume them)."""
    from ctpo.workdir import claim

    d = resolve_run(PAPER, "qwen3_4b_ctpo", 0)
    wd = tmp_path / "w"
    assert claim(wd, d) is None
    _fake_checkpoints(wd, [20], latest=20)
    assert claim(wd, d) is None and vb.latest_step(wd) == 20  # same identity: resume
    d["train"]["verl"]["gpu_memory_utilization"] = 0.5
    moved = Path(claim(wd, d))
    assert moved.parent == wd / "superseded" and vb.latest_step(wd) == 0
    assert (moved / "checkpoints" / "global_step_20" / "actor").is_dir()
    assert "run config changed" in capsys.readouterr().out


def test_hydra_writes_into_the_workdir_not_the_cwd(tmp_path):
    """verl's main_ppo is a @hydra.main app (version_base=None): with the launcher's hydra.* overrides a Hydra
    app of the same kind writes its .hydra/ config and log under <workdir>/hydra and nothing into the cwd."""
    wd = tmp_path / "runs" / "x y" / "seed0"
    argv = verl_argv(_cfg("ctpo"), wd)
    hydra_args = [a for a in argv if a.startswith("hydra.")]
    assert hydra_args == [f"hydra.run.dir='{wd.resolve() / 'hydra'}'"]
    app = tmp_path / "main_ppo.py"
    app.write_text("import hydra\n\n@hydra.main(config_path=None, config_name=None, version_base=None)\n"
                   "def main(cfg):\n    print('ran')\n\nmain()\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = subprocess.run([sys.executable, str(app), *hydra_args], cwd=cwd, capture_output=True, text=True,
                         timeout=HANG_S)
    assert res.returncode == 0 and "ran" in res.stdout, res.stderr
    assert list(cwd.iterdir()) == []
    assert (wd / "hydra" / ".hydra" / "config.yaml").is_file() and (wd / "hydra" / "main_ppo.log").is_file()
    c = _compose_hydra(argv[3:])
    assert c.hydra.run.dir == str(wd.resolve() / "hydra")


def _compose_hydra(overrides: list[str]):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=overrides, return_hydra_config=True)


def _log(path: Path, records: list[tuple[int, dict]], cut_last: bool = False) -> None:
    text = "".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in records)
    if cut_last:
        text = text[:-15]  # a kill mid-write
    path.write_text(text)


def test_metrics_conversion_maps_verl_keys_and_later_attempts_win(tmp_path):
    a1, a2, out = tmp_path / "attempt1.jsonl", tmp_path / "attempt2.jsonl", tmp_path / "metrics.jsonl"
    step = lambda r, kl, clip: {"critic/rewards/mean": r, "critic/score/mean": r, "actor/ppo_kl": kl, "actor/pg_clipfrac": clip,  # noqa: E731
                                "response_length/mean": 900.0 + r, "training/num_turns/mean": 3.0,
                                "actor/entropy": 0.4, "actor/grad_norm": 0.2, "actor/pg_loss": -0.01,
                                "timing_s/step": 120.0, "training/global_step": 0}
    _log(a1, [(1, step(0.1, 0.002, 0.01)), (2, step(0.2, -0.004, 0.02)),
              (2, {"val-core/math-ai/aime25/acc/mean@32": 0.25, "val-core/math-ai/aime25/reward/mean@32": 0.3,
                   "val-aux/math-ai/aime25/reward/std@32": 0.1, "val-core/math-ai/aime26/reward/mean@32": 0.125}),
              (3, step(0.3, 0.0, 0.03))], cut_last=True)
    d3 = step(0.35, 0.001, 0.5)
    d3.update({schema.CLIP_FRAC: 0.07, schema.CLIP_FRAC_LOW: 0.03, schema.LOG_RATIO_MEAN: -0.5})  # from our plugin
    _log(a2, [(3, d3), (4, step(0.4, 0.003, 0.04))])
    assert convert_logs([a1, a2], out) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(schema.TRAIN_KEYS) <= set(r)
    r1, r2, r3 = rows[0], rows[1], rows[2]
    assert r1[schema.REWARD_MEAN] == 0.1 and r1[schema.ACCURACY] == 0.1 and r1[schema.RESPONSE_LENGTH] == 900.1
    assert r1[schema.LOG_RATIO_MEAN] == -0.002  # -ppo_kl
    # verl's pg_clipfrac (clip active) is never taken for the out-of-band clip fraction of Figure 2
    assert r1[schema.CLIP_FRAC_ACTIVE] == 0.01 and r1[schema.CLIP_FRAC] is None and r1[schema.CLIP_FRAC_LOW] is None
    assert r1[schema.TURNS] == 3.0 and r1[schema.ENTROPY] == 0.4 and r1[schema.GRAD_NORM] == 0.2
    assert r1[schema.PG_LOSS] == -0.01 and r1[schema.STEP_TIME_S] == 120.0 and r1[schema.TOOL_CALLS] is None
    assert r2["val/aime25/avg_at_k"] == 0.25 and r2["val/aime26/avg_at_k"] == 0.125  # acc first, else reward
    assert "val/aime25/avg_at_k" not in r1
    assert r3[schema.REWARD_MEAN] == 0.35  # the re-trained step from attempt 2 replaces attempt 1's
    assert r3[schema.CLIP_FRAC] == 0.07 and r3[schema.CLIP_FRAC_LOW] == 0.03 and r3[schema.LOG_RATIO_MEAN] == -0.5


def test_rollout_dump_shards_merge_to_schema_npz(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for i, (n, T) in enumerate([(2, 5), (3, 7)]):
        mask = (rng.random((n, T)) < 0.8).astype(np.int64)
        mask[:, 0] = 0  # an observation first: the first model token is not at 0
        mask[0, 1] = 1
        adv_seq = rng.normal(size=n)
        arrays = {"old_log_prob": rng.normal(size=(n, T)), "log_prob": rng.normal(size=(n, T)),
                  "response_mask": mask, "advantages": np.repeat(adv_seq[:, None], T, axis=1)}
        (tmp_path / "dumps" / "step50").mkdir(parents=True, exist_ok=True)
        np.savez(tmp_path / "dumps" / "step50" / f"rank{i}.npz", **arrays)
        shards.append((arrays, adv_seq))
    assert convert_dumps(tmp_path / "dumps", tmp_path / "rollouts", [50, 100]) == [50]
    with np.load(tmp_path / "rollouts" / "step50.npz") as z:
        assert set(z.files) == set(schema.ROLLOUT_ARRAYS)
        assert z["log_prob"].shape == (5, 7) and z["response_mask"].dtype == np.int8
        row = 0
        for arrays, adv_seq in shards:
            n, T = arrays["response_mask"].shape
            for j in range(n):
                for t in range(7):
                    want_mask = arrays["response_mask"][j, t] if t < T else 0
                    want_lp = np.float32(arrays["log_prob"][j, t]) if t < T else 0.0
                    assert z["response_mask"][row, t] == want_mask and z["log_prob"][row, t] == want_lp
                assert z["advantages"][row] == np.float32(adv_seq[j])
                row += 1
    np.savez(tmp_path / "dumps" / "step50" / "rank9.npz", log_prob=np.zeros((1, 2)))
    with pytest.raises(DumpError, match=r"rank9\.npz: missing arrays"):
        convert_dumps(tmp_path / "dumps", tmp_path / "rollouts", [50])


def _fake_checkpoints(wd: Path, steps: list[int], latest: int) -> None:
    for s in steps:
        (wd / "checkpoints" / f"global_step_{s}" / "actor").mkdir(parents=True)
    (wd / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(latest))


def test_done_only_when_the_step_count_says_so(tmp_path):
    cfg = _cfg("grpo")
    wd, res = tmp_path / "w", tmp_path / "r"
    _fake_checkpoints(wd, [280, 300], latest=300)
    (wd / "verl_logs").mkdir(parents=True)
    _log(wd / "verl_logs" / "attempt1.jsonl", [(300, {"critic/rewards/mean": 0.5})])
    with pytest.raises(vb.VerlRunError, match=r"last saved step 300 < train.total_steps 305"):
        vb.finalize(cfg, res, wd, ["verl"])
    assert not (res / "done.json").exists()
    _fake_checkpoints(wd, [305], latest=305)
    done = vb.finalize(cfg, res, wd, ["verl"])
    on_disk = json.loads((res / "done.json").read_text())
    assert on_disk["final_step"] == done["final_step"] == 305
    assert on_disk["saved_steps"] == [280, 300, 305] and on_disk["attempts"] == 1
    assert json.loads((res / "provenance.json").read_text())["command"] == ["verl"]
    assert (res / "metrics.jsonl").read_text().count("\n") == 1


def test_signals_are_forwarded_to_the_child_process_group(tmp_path):
    marker = tmp_path / "got"
    child = textwrap.dedent(f"""
        import os, signal, sys, time
        def h(signum, frame):
            open({str(marker)!r}, "w").write(str(signum)); sys.exit(0)
        signal.signal(signal.SIGUSR1, h)
        os.kill(os.getppid(), signal.SIGUSR1)  # as if the scheduler signalled the launcher
        time.sleep({HANG_S})  # the forwarded signal ends it long before
        sys.exit(3)
    """)
    before = signal.getsignal(signal.SIGUSR1)
    rc = vb.run_verl([sys.executable, "-c", child], env=dict(os.environ)).rc
    assert rc == 0 and marker.read_text() == str(int(signal.SIGUSR1))
    assert signal.getsignal(signal.SIGUSR1) is before  # our handler is removed after the run


def test_merge_command_and_missing_checkpoint(tmp_path, capsys):
    cmd = vb.merge_command(tmp_path, 40, tmp_path / "hf" / "step40")
    assert cmd[1:] == ["-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                       str(tmp_path / "checkpoints" / "global_step_40" / "actor"), "--target_dir",
                       str(tmp_path / "hf" / "step40")]
    _fake_checkpoints(tmp_path, [20], latest=20)
    with pytest.raises(FileNotFoundError, match=r"global_step_40/actor: no verl checkpoint for step 40 \(saved steps: \[20\]\)"):
        vb.merge_checkpoint(tmp_path, 40)
    marker = tmp_path / "merged40.json"
    assert vb.cli(["merge", "--workdir", str(tmp_path), "--step", "40", "--done", str(marker)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no verl checkpoint for step 40" in err[0] and not marker.exists()


def test_merge_runs_with_the_hubs_offline(tmp_path, monkeypatch):
    """The merge job runs on a compute node like training and evaluation: verl's merger gets OFFLINE_ENV."""
    from ctpo.hub import OFFLINE_ENV

    _fake_checkpoints(tmp_path, [20], latest=20)
    seen = []

    def merger(cmd, check, env):
        seen.append(env)
        target = Path(cmd[cmd.index("--target_dir") + 1])
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(vb.subprocess, "run", merger)
    assert vb.merge_checkpoint(tmp_path, 20) == tmp_path / "hf" / "step20"
    assert len(seen) == 1 and {k: seen[0].get(k) for k in OFFLINE_ENV} == OFFLINE_ENV


def test_ray_temp_dir_is_short_enough_for_ray_sockets(tmp_path):
    deep = tmp_path / ("x" * 80) / "runs" / "paper" / "qwen3_14b_ctpo_fixed" / "seed0"
    p = vc.ray_temp_dir(deep)
    assert len(str(p)) <= 32 and p == vc.ray_temp_dir(deep)  # stable per workdir
    assert p != vc.ray_temp_dir(deep.parent / "seed1")  # distinct per job


def _tiny_fsdp_checkpoint(actor: Path):
    """A world-size-1 verl FSDP actor checkpoint of a tiny Qwen3 (plain tensors, as FSDP saves unsharded)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "1", "+", "=", "2"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    model = Qwen3ForCausalLM(config)
    (actor / "huggingface").mkdir(parents=True)
    config.save_pretrained(actor / "huggingface")
    hf_tok.save_pretrained(actor / "huggingface")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"world_size": 1}))
    return state


def test_merge_cli_turns_a_verl_checkpoint_into_a_loadable_hf_dir(tmp_path):
    from safetensors.torch import load_file

    wd = tmp_path / "runs" / "paper" / "qwen3_4b_ctpo" / "seed0"
    state = _tiny_fsdp_checkpoint(wd / "checkpoints" / "global_step_20" / "actor")
    marker = tmp_path / "results" / "merged_step20.json"
    from test_hub import _unshare_net

    res = subprocess.run(  # with the network cut where permitted, as on a compute node
        [*_unshare_net(), sys.executable, "-m", "ctpo.train.verl_backend", "merge", "--workdir", str(wd), "--step", "20",
         "--done", str(marker)], capture_output=True, text=True, cwd=ROOT, timeout=HANG_S,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    hf = wd / "hf" / "step20"
    assert json.loads(marker.read_text()) == {"workdir": str(wd), "step": 20, "hf_dir": str(hf)}
    assert not (wd / "hf" / "step20.partial").exists()
    merged = {}
    for f in hf.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert set(merged) == set(state)
    for k, v in state.items():  # verl's merger stores bf16
        assert merged[k].dtype.is_floating_point and (merged[k].float() == v.bfloat16().float()).all(), k
    from ctpo.tokenizer import load_tokenizer

    assert load_tokenizer(hf).encode("1 + 1 = 2") == [3, 4, 3, 5, 6]


def test_dump_writer_counts_steps_and_writes_only_whole_dump_steps(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    w = DumpWriter(tmp_path / "dumps", steps=[50, 52], start_step=49, calls_per_step=3, rank="0")
    calls = []
    for step in (49, 50, 51, 52):
        for c in range(3 if step != 52 else 2):  # step 52 is cut short by a preemption
            n, T = 1, int(rng.integers(3, 9))
            mb = {"old_log_prob": rng.normal(size=(n, T)), "log_prob": rng.normal(size=(n, T)),
                  "response_mask": (rng.random((n, T)) < 0.7).astype(np.int64), "advantages": np.full((n, T), c - 1.0)}
            calls.append((step, mb))
            assert w.step == step
            w.record(*(torch.tensor(mb[k]) for k in ("old_log_prob", "log_prob", "response_mask", "advantages")))
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["step50"]
    assert convert_dumps(tmp_path / "dumps", tmp_path / "out", [50, 52]) == [50]
    mine = [mb for s, mb in calls if s == 50]
    t_max = max(mb["log_prob"].shape[1] for mb in mine)
    with np.load(tmp_path / "out" / "step50.npz") as z:
        for i, mb in enumerate(mine):
            T = mb["log_prob"].shape[1]
            assert np.allclose(z["old_log_prob"][i, :T], mb["old_log_prob"][0].astype(np.float32))
            assert (z["log_prob"][i, T:t_max] == 0).all() and (z["response_mask"][i, T:] == 0).all()
            first = int(np.argmax(mb["response_mask"][0])) if mb["response_mask"][0].any() else None
            assert z["advantages"][i] == (mb["advantages"][0, first] if first is not None else 0.0)
    assert writer_from_env({}) is None
    with pytest.raises(ValueError, match="CTPO_DUMP_START_STEP"):
        writer_from_env({"CTPO_DUMP_DIR": str(tmp_path), "CTPO_DUMP_STEPS": "50"})


def test_agent_loop_copy_carries_the_run_rollout_config(tmp_path):
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from ctpo.agent.verl_loop import rollout_config_from

    cfg = _cfg("ctpo")
    path = vb.write_agent_loop_config(cfg, tmp_path)
    entries = OmegaConf.to_container(OmegaConf.load(path))
    (entry,) = [e for e in entries if e["name"] == "ctpo_tir"]
    assert entry["_target_"] == "ctpo.agent.verl_loop.CtpoTirAgentLoop"
    assert entry["rollout"] == asdict(cfg.rollout)
    assert (entry["rollout"]["max_turns"], entry["rollout"]["max_response_tokens"]) == (5, 8000)
    assert rollout_config_from(entry["rollout"]) == cfg.rollout  # what the loop builds from it


def test_verl_loads_the_reward_from_the_composed_config(composed):
    """verl's own loader on the launcher's reward path: a file path fails (the @dataclass in ctpo/reward.py
    needs its module in sys.modules); the package path loads and scores."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    _, c, _ = composed["ctpo"]
    fn = get_custom_reward_fn(c)
    assert fn(data_source="toy", solution_str="so \\boxed{42}", ground_truth="42", extra_info={})["score"] == 1.0
    assert fn(data_source="toy", solution_str="so \\boxed{41}", ground_truth="42", extra_info={})["score"] == 0.0


def test_verl_v1_task_runner_imports_and_its_deps_are_pinned_for_both_installs():
    """verl 0.9.1's main_ppo (TaskRunnerV1) imports transfer_queue (+ pyzmq, msgspec) unconditionally; plain
    `verl` does not pull them, so the CPU install (pyproject) and the GPU env (envs/gpu.yaml) pin them."""
    import importlib
    import re

    import yaml

    importlib.import_module("verl.trainer.ppo.v1.trainer_base")  # `import transfer_queue as tq` at the top
    importlib.import_module("verl.trainer.ppo.v1.agent_loop_tq")
    import tomllib

    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    gpu = [d for d in yaml.safe_load((ROOT / "envs" / "gpu.yaml").read_text())["dependencies"]
           if isinstance(d, dict)][0]["pip"]
    for name, module in (("TransferQueue", "transfer_queue"), ("pyzmq", "zmq"), ("msgspec", "msgspec")):
        pins = [re.split(r"\s*#", d)[0].strip() for d in (*core, *gpu) if d.split("==")[0].strip() == name]
        assert len(pins) == 2 and len(set(pins)) == 1 and "==" in pins[0], (name, pins)
        importlib.import_module(module)
