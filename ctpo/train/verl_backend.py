"""The GPU training backend: our RunConfig -> `python -m verl.trainer.main_ppo` (verl 0.9.1) with the
paper's setup (arXiv 2605.07331, Sec. 4.1; the authors' released launcher), run as a child process.
Every value comes from the run config (verl-only settings: `train.verl`), so it is in the run identity.

    python -m ctpo.train.verl_backend command --config C.json --results R --workdir W   # print the command
    python -m ctpo.train.verl_backend run     --config C.json --results R --workdir W   # train
    python -m ctpo.train.verl_backend merge   --workdir W --step N --done M.json        # FSDP -> HF

Layout (W = runs/{exp}/{run}/seed{seed}, R = results/{exp}/train/{run}/seed{seed}; names and paths: ctpo.layout):
  W/checkpoints/global_step_N/actor   verl's FSDP checkpoints (`trainer.default_local_dir`), resume_mode=auto
  W/checkpoints/latest_checkpointed_iteration.txt   the step count that decides "done" (not the exit code)
  W/verl_logs/attempt{K}.jsonl        verl's file logger, one file per launch (verl truncates its file)
  W/hydra/                            Hydra's run dir (`hydra.run.dir`; not ./outputs/ in the cwd)
  W/rollout_dumps/step{N}/*.npz       per-rank shards written by ctpo.verl_plugin (env CTPO_DUMP_DIR/_STEPS)
  W/rollouts/step{N}.npz              merged dumps (ctpo.schema.ROLLOUT_ARRAYS) for the diagnostics
  W/wandb_run_id, W/wandb/            W&B run id (reused on requeue: WANDB_RUN_ID + WANDB_RESUME=allow)
  W/hf/step{N}/                       merged HF model for evaluation (`merge_checkpoint`)
  R/metrics.jsonl, R/provenance.json, R/done.json

Preemption and time limits (`ctpo.train.verl_preempt`): on SIGTERM / SIGUSR1, or when the SLURM job's end
time leaves no room for another step, the launcher writes W/verl/save_request; verl's driver
(`ctpo.train.verl_save_hook.SaveOnRequest`, verl's `trainer.checkpoint_callback_class`) then saves at the
end of the step in progress and stops, and the launcher exits non-zero (128 + signal, or 75) so SLURM's
requeue or Snakemake's retry resumes from that checkpoint with the same W&B run. SIGINT (and a second
SIGTERM) stop verl's process group at once. A checkpoint at an epoch boundary can resume into zero steps
(verl issues 5725/7401): 40,315 prompts / 512 = 78 steps per epoch and saves every 20 steps never
coincide before step 305 (lcm(20, 78) = 780). A save on request can land on one (step 78, 156, 234); the
v1 trainer used here takes a fresh data iterator on StopIteration (trainer_base.py, the batch fetch), so
by its source it resumes into the next epoch rather than stopping.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ctpo import layout
from ctpo.agent.protocols import verl_protocol_overrides
from ctpo.config import REPO_ROOT, RunConfig, hydra_quote, load_run_config
from ctpo.exitcodes import EXIT_PERMANENT
from ctpo.train import ray_cluster, retention, verl_preempt
from ctpo.workdir import claim
from ctpo.io import read_jsonl, write_json, write_text
from ctpo.run_health import degenerate_reward

VERL_MAIN = "verl.trainer.main_ppo"
PLUGIN_MODULE = "ctpo.verl_plugin"
AGENT_LOOP_NAME = "ctpo_tir"  # registered in configs/verl/agent_loop.yaml (rollout.protocol ctpo_tir)
AGENT_LOOP_CONFIG = REPO_ROOT / "configs" / "verl" / "agent_loop.yaml"  # template; each run gets a copy
# a package path, not a file: verl loads a file path without registering the module in sys.modules, so
# the @dataclass in ctpo/reward.py fails at import and every reward worker dies. The module is reward.grader's
# (ctpo.grading): pkg://ctpo.release_reward for the paper experiment, pkg://ctpo.reward for the strict grader.
REWARD_FN = "compute_score"


def reward_module(grader: str) -> str:
    """verl's reward.custom_reward_function.path for `reward.grader`."""
    from ctpo import grading

    return f"pkg://{grading.module(grader)}"
HYDRA_DIR = "hydra"  # <workdir>/hydra: Hydra's run dir for verl's main_ppo (its .hydra/ config and log)
_RAY_TMP_MAX = 32  # Ray's unix socket paths (<tmp>/session_<date>_<pid>/sockets/...) must stay < 108 chars


class VerlRunError(RuntimeError):
    """A verl run that ended without reaching its final step; the message names the workdir."""


def _q(path: str | Path) -> str:
    """A Hydra-quoted absolute path (`ctpo.config.hydra_quote`: '=', ',', spaces, quotes and `${..}` stay text)."""
    return hydra_quote(str(Path(path).resolve()))


def _b(x: bool) -> str:
    return "true" if x else "false"


def checkpoint_dir(workdir: str | Path) -> Path:
    return layout.workdir(workdir).path("checkpoints")


def ray_temp_dir(workdir: str | Path) -> Path:
    """`<workdir>/ray` when short enough for Ray's socket paths and plain (main_ppo reads it before it resolves
    its config, so it must need no escaping), else /tmp/ctpo-ray-<hash of workdir>."""
    p = Path(workdir).resolve() / "ray"
    if len(str(p)) <= _RAY_TMP_MAX and re.fullmatch(r"[A-Za-z0-9_./-]+", str(p)):
        return p
    return Path("/tmp") / f"ctpo-ray-{hashlib.sha256(str(p).encode()).hexdigest()[:10]}"


def agent_loop_path(workdir: str | Path) -> Path:
    return layout.workdir(Path(workdir).resolve()).path("agent_loop")


def write_agent_loop_config(cfg: RunConfig, workdir: str | Path) -> Path:
    """The run's copy of configs/verl/agent_loop.yaml with the `ctpo_tir` entry's `rollout` = cfg.rollout."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(AGENT_LOOP_CONFIG))
    names = [e.get("name") for e in entries] if isinstance(entries, list) else []
    if AGENT_LOOP_NAME not in names:
        raise ValueError(f"{AGENT_LOOP_CONFIG}: expected a list holding an entry named '{AGENT_LOOP_NAME}', got {names}")
    for e in entries:
        if e["name"] == AGENT_LOOP_NAME:
            e["rollout"] = asdict(cfg.rollout)
    path = agent_loop_path(workdir)
    write_text(path, "# written by ctpo.train.verl_backend from " + str(AGENT_LOOP_CONFIG.relative_to(REPO_ROOT))
               + " and the run config\n" + OmegaConf.to_yaml(OmegaConf.create(entries)))
    return path


def experiment_name(cfg: RunConfig) -> str:
    """verl's `trainer.experiment_name` = the W&B run name (as ctpo.tracking names local runs)."""
    return f"{cfg.run}-seed{cfg.seed}"


def paper_overrides(cfg: RunConfig, workdir: str | Path, init: str | Path | None = None) -> list[str]:
    """Hydra overrides for everything but the loss (the paper's setup): every value comes from `cfg`
    (`train.verl` holds the verl-only settings); the literals left are contracts this launcher and our plugin
    rely on (GRPO advantages, no reward KL, decoupled rollout IS, fixed micro-batches, behaviour log-probs,
    resumable checkpoints, multi-turn TIR, our reward and save hook). init: the policy dir to start from
    (the toy's SFT warm start, or the verified local snapshot of `model.revision`), else `model.path`."""
    t, r, m, v = cfg.train, cfg.rollout, cfg.model, cfg.train.verl
    if "${" in str(Path(workdir).resolve()):  # Hydra interpolates its own run dir and log paths: no escape holds
        raise ValueError(f"--workdir {workdir}: a path holding '${{' cannot be verl's (Hydra's) run dir; choose another")
    if v is None:
        raise ValueError("run config: train.verl (the verl launcher's settings) is required for the verl backend")
    model_path = str(Path(init).resolve()) if init else m.path
    if not model_path:
        raise ValueError("run config: model.path must name the policy (or pass --init POLICY_DIR) for the verl backend")
    if not cfg.data.val:
        raise ValueError("run config: data.val must name at least one validation parquet for the verl backend")
    val = "[" + ",".join(_q(v) for v in cfg.data.val) + "]"
    ckpt = checkpoint_dir(workdir).resolve()
    a, ro = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    return [
        # algorithm: GRPO advantages, no KL anywhere, sequence-level rollout IS (verl rollout_correction)
        "algorithm.adv_estimator=grpo",
        f"algorithm.norm_adv_by_std_in_grpo={_b(t.norm_adv_by_std)}",
        "algorithm.use_kl_in_reward=false",
        f"algorithm.rollout_correction.rollout_is={t.rollout_is if t.rollout_is else 'null'}",
        f"algorithm.rollout_correction.rollout_is_threshold={float(t.rollout_is_threshold)}",
        "algorithm.rollout_correction.rollout_is_batch_normalize=false",
        "algorithm.rollout_correction.bypass_mode=false",
        # data: DeepScaleR train, benchmark val, long prompts filtered (never truncated)
        f"data.train_files={_q(cfg.data.train)}",
        f"data.val_files={val}",
        f"data.train_batch_size={t.prompts_per_step}",
        f"data.max_prompt_length={r.max_prompt_tokens}",
        f"data.max_response_length={r.max_response_tokens}",
        f"data.filter_overlong_prompts={_b(v.filter_overlong_prompts)}",
        f"data.truncation={v.truncation}",
        "data.return_raw_chat=true",
        f"data.seed={cfg.seed}",
        f"+data.apply_chat_template_kwargs.enable_thinking={_b(r.enable_thinking)}",
        # model + our plugin (registers the ctpo losses in every worker at import)
        f"actor_rollout_ref.model.path={hydra_quote(model_path)}",
        f"actor_rollout_ref.model.external_lib={PLUGIN_MODULE}",
        f"actor_rollout_ref.model.use_remove_padding={_b(v.use_remove_padding)}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={_b(v.gradient_checkpointing)}",
        # actor: PPO batch sizes in prompts (verl multiplies by rollout.n), schedule, KL / entropy
        f"{a}.ppo_mini_batch_size={t.mini_batch_prompts}",
        f"{a}.ppo_micro_batch_size_per_gpu={t.micro_batch_size_per_gpu}",
        f"{a}.ppo_epochs={v.ppo_epochs}",
        f"{a}.use_dynamic_bsz=false",  # fixed micro-batches: the rollout-dump step counter relies on it
        f"{a}.optim.lr={float(t.lr)}",
        f"{a}.optim.lr_scheduler_type={v.lr_scheduler}",
        f"{a}.optim.lr_warmup_steps_ratio={float(v.lr_warmup_steps_ratio)}",
        f"{a}.optim.weight_decay={float(t.weight_decay)}",
        f"{a}.optim.clip_grad={float(t.grad_clip)}",
        f"{a}.grad_clip={float(t.grad_clip)}",
        f"{a}.use_kl_loss={_b(v.kl_loss_coef > 0)}",
        f"{a}.kl_loss_coef={float(v.kl_loss_coef)}",
        f"{a}.entropy_coeff={float(v.entropy_coeff)}",
        # the reference model's log-probs (used only with kl_loss_coef > 0): same micro-batches as the actor
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={t.micro_batch_size_per_gpu}",
        f"{a}.fsdp_config.param_offload={_b(v.param_offload)}",
        f"{a}.fsdp_config.optimizer_offload={_b(v.optimizer_offload)}",
        f"{a}.checkpoint.save_contents=[model,optimizer,extra]",
        # rollout: vLLM async server, TP 1, behaviour log-probs for rollout IS
        f"{ro}.name=vllm",
        f"{ro}.mode=async",
        f"{ro}.tensor_model_parallel_size={v.rollout_tp}",
        f"{ro}.gpu_memory_utilization={float(v.gpu_memory_utilization)}",
        f"{ro}.max_num_seqs={r.max_num_seqs}",  # the release's 1024 (verl 0.9.1 defaults to 256)
        f"{ro}.calculate_log_probs=true",
        f"{ro}.checkpoint_engine.update_weights_bucket_megabytes={v.weight_sync_bucket_mb}",
        f"{ro}.n={r.n}",
        f"{ro}.temperature={float(r.temperature)}",
        f"{ro}.top_p={float(r.top_p)}",
        f"{ro}.seed={cfg.seed}",
        f"{ro}.log_prob_micro_batch_size_per_gpu={t.micro_batch_size_per_gpu}",
        f"{ro}.val_kwargs.n={cfg.eval.k}",
        f"{ro}.val_kwargs.temperature={float(cfg.eval.temperature)}",
        f"{ro}.val_kwargs.top_p={float(cfg.eval.top_p)}",
        f"{ro}.val_kwargs.do_sample=true",
        # multi-turn TIR: our agent loop and sandbox tool
        f"{ro}.multi_turn.enable=true",
        f"{ro}.multi_turn.max_assistant_turns={r.max_turns}",
        f"{ro}.multi_turn.max_user_turns={r.max_turns}",
        f"{ro}.multi_turn.max_tool_response_length={r.max_obs_tokens}",
        # tool protocol (rollout.protocol): agent loop, tool parser, tool config (ctpo.agent.protocols)
        *verl_protocol_overrides(r.protocol, agent_loop_path(workdir), ro),
        # reward: reward.grader's scorer (ctpo.grading), for training and validation alike
        f"reward.custom_reward_function.path={reward_module(cfg.reward.grader)}",
        f"reward.custom_reward_function.name={REWARD_FN}",
        # trainer: 1 node x 8 GPUs, 305 steps, save + validate every 20, resume from our workdir
        f"trainer.nnodes={t.n_nodes}",
        f"trainer.n_gpus_per_node={t.n_gpus}",
        f"trainer.total_training_steps={t.total_steps}",
        f"trainer.save_freq={t.save_freq}",
        f"trainer.test_freq={t.test_freq}",
        f"trainer.val_before_train={_b(v.val_before_train)}",
        "trainer.resume_mode=auto",
        f"trainer.checkpoint_callback_class={verl_preempt.HOOK_CLASS}",  # save on signal / before the end time
        f"trainer.default_local_dir={_q(ckpt)}",
        f"trainer.project_name={hydra_quote(cfg.wandb.project)}",
        f"trainer.experiment_name={hydra_quote(experiment_name(cfg))}",
        f"trainer.logger={_loggers(cfg)}",
        # Ray: a private local cluster per job (own temp dir, dynamic ports, no dashboard port clash); with
        # train.n_nodes > 1 the job's own cluster instead (ctpo.train.ray_cluster, which drops these two)
        f"+ray_kwargs.ray_init._temp_dir={_q(ray_temp_dir(workdir))}",
        "+ray_kwargs.ray_init.include_dashboard=false",
        # Hydra: its run dir (.hydra/ composed config, main_ppo.log) in the workdir, not ./outputs/<date> in the cwd
        f"hydra.run.dir={_q(Path(workdir) / HYDRA_DIR)}",
    ]


def _loggers(cfg: RunConfig) -> str:
    from ctpo.tracking import resolve_mode

    loggers = ["console", "file"]  # file: verl's FileLogger -> VERL_FILE_LOGGER_PATH (our metrics source)
    if resolve_mode(cfg.wandb.mode) != "disabled":
        loggers.append("wandb")
    return "[" + ",".join(loggers) + "]"


VERL_DEVICES = ("gpu", "cpu")


def device_profile(cfg: RunConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(Hydra key -> value, environment) that `train.verl_device` changes; empty for the paper's gpu."""
    from ctpo.train import verl_cpu

    dev, engine = cfg.train.verl_device, cfg.train.verl_cpu_rollout
    if dev not in VERL_DEVICES:
        raise ValueError(f"run config: train.verl_device: expected one of {VERL_DEVICES}, got '{dev}'")
    if engine not in verl_cpu.ROLLOUTS:
        raise ValueError(f"run config: train.verl_cpu_rollout: expected one of {verl_cpu.ROLLOUTS}, got '{engine}'")
    if dev == "gpu":
        if engine != verl_cpu.ROLLOUTS[0]:
            raise ValueError(f"run config: train.verl_cpu_rollout '{engine}' applies to train.verl_device cpu only "
                             "(the gpu run always uses vLLM)")
        return {}, {}
    try:
        verl_cpu.check_verl_version()  # the profile reaches into verl internals
        if engine == "vllm":
            verl_cpu.check_vllm_cpu()
    except RuntimeError as e:
        raise VerlRunError(str(e)) from None
    return verl_cpu.overrides(cfg.train.n_gpus * cfg.train.n_nodes, engine), verl_cpu.env(engine)


def require_cuda(cfg: RunConfig) -> None:
    """`train.verl_device: gpu` needs n_gpus CUDA devices on this node: otherwise one line and EXIT_PERMANENT,
    before Ray or verl start (verl would fail minutes later, deep in a worker, and the job be resubmitted)."""
    if cfg.train.verl_device != "gpu":
        return
    import torch

    from ctpo.exitcodes import fail_permanent

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen < cfg.train.n_gpus:
        fail_permanent(
            f"error: train.verl_device gpu with train.n_gpus {cfg.train.n_gpus}: {seen} CUDA device(s) visible to "
            f"{sys.executable} (torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it in the GPU environment on a GPU node, or use "
            f"train.verl_device cpu for a CPU rehearsal")


def apply_profile(overrides: list[str], profile: dict[str, str]) -> list[str]:
    """`overrides` with the profile's keys replaced in place (others appended): one value per key."""
    bare = {k.lstrip("+"): (k, v) for k, v in profile.items()}
    out, seen = [], set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+")
        if key in bare:
            k, v = bare[key]
            out.append(f"{k}={v}")
            seen.add(key)
        else:
            out.append(o)
    return out + [f"{k}={v}" for key, (k, v) in bare.items() if key not in seen]


def build_command(cfg: RunConfig, results_dir: str | Path, workdir: str | Path,
                  init: str | Path | None = None) -> list[str]:
    """argv of the verl run: `python -m verl.trainer.main_ppo <overrides>` (loss from ctpo.verl_plugin), with
    the device profile's keys replaced (`train.verl_device`)."""
    from ctpo.verl_plugin import verl_overrides

    del results_dir  # verl writes nothing into results/; we convert after the run (`finalize`)
    argv = apply_profile([*paper_overrides(cfg, workdir, init), *verl_overrides(cfg.loss)], device_profile(cfg)[0])
    if cfg.train.n_nodes > 1:  # verl joins the job's Ray cluster (ctpo.train.ray_cluster), which has these set
        argv = ray_cluster.drop_cluster_keys(argv)
    return [sys.executable, "-m", VERL_MAIN, *argv]


def format_command(argv: list[str]) -> str:
    """Shell-quoted, one override per line (what `--print-command` shows)."""
    head = " ".join(shlex.quote(a) for a in argv[:3])
    return " \\\n    ".join([head, *(shlex.quote(a) for a in argv[3:])]) + "\n"


# ----------------------------------------------------------------------------- W&B and environment


def loss_calls_per_step(cfg: RunConfig) -> int:
    """Policy-loss calls per rank per training step (fixed micro-batches, no dynamic bsz): one per micro-batch
    and PPO epoch (a dump step's shard holds every epoch's calls)."""
    t = cfg.train
    world = t.n_gpus * t.n_nodes
    responses = t.prompts_per_step * cfg.rollout.n
    if responses % (world * t.micro_batch_size_per_gpu) or (t.mini_batch_prompts * cfg.rollout.n) % world:
        raise ValueError(
            f"run config: train.prompts_per_step * rollout.n ({responses}) and train.mini_batch_prompts * rollout.n "
            f"must split evenly over {world} GPUs x train.micro_batch_size_per_gpu ({t.micro_batch_size_per_gpu})"
        )
    return responses // world // t.micro_batch_size_per_gpu * t.verl.ppo_epochs


def next_attempt(workdir: str | Path) -> int:
    logs = layout.workdir(workdir).path("verl_logs")
    return 1 + len(list(logs.glob("attempt*.jsonl"))) if logs.is_dir() else 1


def run_env(cfg: RunConfig, workdir: str | Path, attempt: int, base: dict | None = None) -> dict:
    """Environment of the verl process: W&B resume, file-logger path, rollout-dump contract, no foreign Ray."""
    from ctpo.tracking import fallback_message, usable_mode, wandb_group, wandb_run_id

    workdir = Path(workdir).resolve()
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)  # never attach to somebody else's cluster
    # nor to a parent's W&B service: it would keep a killed attempt's run open ("run ID ... is in use")
    env.pop("WANDB_SERVICE", None)
    env["WANDB_RUN_ID"] = wandb_run_id(dataclasses.asdict(cfg), workdir)
    env["WANDB_RESUME"] = "allow"
    env["WANDB_RUN_GROUP"] = wandb_group(dataclasses.asdict(cfg))  # the local trainer's and the reports' group
    env["WANDB_DIR"] = str(workdir)
    t0 = time.monotonic()
    mode, reason = usable_mode(cfg.wandb.mode)  # online only when the server answers: never a 90 s stall
    if reason:
        print(fallback_message(reason, time.monotonic() - t0, layout.workdir(workdir).path("wandb_dir")),
              file=sys.stderr, flush=True)
    if mode != "disabled":
        env["WANDB_MODE"] = mode
    if cfg.wandb.entity:
        env["WANDB_ENTITY"] = cfg.wandb.entity
    env["VERL_FILE_LOGGER_PATH"] = str(layout.workdir(workdir).path("verl_log", attempt=attempt))
    env["CTPO_DUMP_DIR"] = str(layout.workdir(workdir).path("rollout_shards"))
    env["CTPO_DUMP_STEPS"] = ",".join(str(s) for s in cfg.train.dump_steps)
    env["CTPO_DUMP_START_STEP"] = str(latest_step(workdir) + 1)
    env["CTPO_DUMP_CALLS_PER_STEP"] = str(loss_calls_per_step(cfg))
    env[verl_preempt.ENV_REQUEST] = str(verl_preempt.request_path(workdir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(device_profile(cfg)[1])
    return env


# ----------------------------------------------------------------------------- running


def latest_step(workdir: str | Path) -> int:
    """verl's last saved step (0 when none): the only evidence of progress we trust."""
    f = layout.workdir(workdir).path("verl_latest")
    if not f.is_file():
        return 0
    text = f.read_text().strip()
    if not text.isdigit():
        raise VerlRunError(f"{f}: expected an integer step, got {text!r}")
    return int(text)


def list_checkpoints(workdir: str | Path) -> list[int]:
    """Steps of verl's checkpoints on disk (`global_step_N/actor`), ascending."""
    wd = layout.workdir(workdir)
    return [s for s in wd.steps("verl_actor") if wd.path("verl_actor", step=s).is_dir()]


def run_verl(argv: list[str], env: dict, log_path: Path | None = None,
             saves: verl_preempt.SaveController | None = None, progress=None,
             error_grace_s: float = verl_preempt.ERROR_GRACE_S) -> verl_preempt.LaunchOutcome:
    """Run verl in its own process group, its output copied to our stdout (or appended to `log_path`) and
    scanned for errors, and supervise its whole process tree (`verl_preempt.run_with_saves`): SIGINT is
    forwarded to that group; so are SIGTERM/SIGUSR1 without `saves`; with it, the first asks verl to save and
    stop. Whatever way verl ends, nothing of its tree and none of its shared memory outlives the launch."""

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    outcome: list[verl_preempt.LaunchOutcome] = []
    sink = open(log_path, "ab") if log_path is not None else None
    try:
        verl_preempt.run_with_saves(start, saves, progress=progress, error_grace_s=error_grace_s, sink=sink,
                                    outcome=outcome)
    finally:
        if sink is not None:
            sink.close()
    return outcome[0]


def finalize(cfg: RunConfig, results_dir: str | Path, workdir: str | Path, command: list[str]) -> dict:
    """After verl: metrics.jsonl, rollout npz, provenance.json, then done.json (only if the step count says so)."""
    from dataclasses import asdict

    from ctpo.provenance import provenance
    from ctpo.tracking import wandb_run_id
    from ctpo.diagnostics.verl_dumps import convert_dumps
    from ctpo.train.verl_metrics import convert_logs

    results_dir, workdir = Path(results_dir), Path(workdir)
    final = latest_step(workdir)
    if final < cfg.train.total_steps:
        raise VerlRunError(
            f"{layout.workdir(workdir).path('verl_latest')}: last saved step {final} < train.total_steps "
            f"{cfg.train.total_steps}; the run is not done (rerun to resume)"
        )
    wd, rd = layout.workdir(workdir), layout.train_dir(results_dir)
    n_rows = convert_logs(sorted(wd.path("verl_logs").glob("attempt*.jsonl")), rd.path("metrics"))
    convert_dumps(wd.path("rollout_shards"), wd.path("rollouts"), cfg.train.dump_steps)
    cfg_dict = asdict(cfg)
    prov = provenance(cfg_dict)
    prov.update({"backend": "verl", "command": command, "workdir": str(workdir)})
    write_json(rd.path("provenance"), prov)
    rows = read_jsonl(rd.path("metrics"))
    done = layout.TrainDone(
        experiment=cfg.experiment, run=cfg.run, seed=cfg.seed, backend="verl", final_step=final,
        total_steps=cfg.train.total_steps, saved_steps=list_checkpoints(workdir),
        dump_steps=layout.dumped_steps(workdir), metrics_rows=n_rows, wandb_run_id=wandb_run_id(cfg_dict, workdir),
        config_hash=prov["config_hash"], checkpoints=str(checkpoint_dir(workdir)),
        attempts=next_attempt(workdir) - 1, final=rows[-1] if rows else {}, degenerate=degenerate_reward(rows),
    )
    if done.degenerate:
        print(f"train: WARNING {cfg.run} seed {cfg.seed} learned nothing: {done.degenerate}", flush=True)
    return layout.write_done(rd.path("train_done"), done)


def main(cfg: RunConfig, results_dir: str | Path, workdir: str | Path, print_command: bool = False,
         init: str | Path | None = None, command: list[str] | None = None, keep: list[int] | None = None,
         error_grace_s: float = verl_preempt.ERROR_GRACE_S) -> int:
    """Print the verl command, or run verl (resuming if checkpoints exist) and convert its outputs.
    `command` replaces verl's main_ppo (tests run a stand-in that follows its save protocol; it loads no model).
    `keep`: the checkpoint steps evaluation reads (`ctpo.train.retention`; None keeps every checkpoint).
    error_grace_s: after a traceback in verl's output, how long without a new step before the launch is ended
    (a launcher setting: it changes no result)."""
    from ctpo.hub import MissingLocalFiles, require_model, set_offline

    workdir = Path(workdir)
    if not print_command and command is None and cfg.model.kind == "hf" and init is None:
        try:  # compute nodes are offline: the model must be on disk (`python -m ctpo.hub fetch`) at model.revision
            init = require_model(cfg.model.path, cfg.model.revision)  # verl loads that snapshot, not the hub id
        except MissingLocalFiles as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_PERMANENT  # a rerun fails the same way: fetch the model first
    argv = build_command(cfg, results_dir, workdir, init) if command is None else list(command)
    if print_command:
        sys.stdout.write(format_command(argv))
        return 0
    if command is None:
        require_cuda(cfg)
    from ctpo.exitcodes import fail_permanent
    from ctpo.runlock import RunLocked, writer_lock

    try:
        with writer_lock(workdir, log=lambda m: print(m, file=sys.stderr, flush=True)):
            return _train(cfg, results_dir, workdir, argv, keep, error_grace_s)
    except RunLocked as e:
        fail_permanent(f"error: {e}")


def _train(cfg: RunConfig, results_dir: Path, workdir: Path, argv: list[str], keep: list[int] | None,
           error_grace_s: float) -> int:
    """main's body under the run's writer lock: claim, run or resume verl, convert."""
    from ctpo.hub import set_offline

    workdir.mkdir(parents=True, exist_ok=True)
    claim(workdir, dataclasses.asdict(cfg))  # a changed config sets old checkpoints aside (verl would resume them)
    if latest_step(workdir) < cfg.train.total_steps:
        write_agent_loop_config(cfg, workdir)
        attempt = next_attempt(workdir)
        env = set_offline(run_env(cfg, workdir, attempt))
        env.update(retention.env_value(keep))
        write_text(layout.workdir(workdir).path("verl_cmd", attempt=attempt), format_command(argv))
        print(f"[ctpo] verl attempt {attempt}, resuming after step {latest_step(workdir)}", flush=True)
        end, source = verl_preempt.job_end_time()
        print(f"[ctpo] job end time: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))} ({source}); "
              f"a checkpoint is saved before it" if end else f"[ctpo] job end time unknown ({source})", flush=True)
        saves = verl_preempt.SaveController(
            verl_preempt.request_path(workdir), end_time=end, logs_dir=layout.workdir(workdir).path("verl_logs"),
            current_log=Path(env["VERL_FILE_LOGGER_PATH"]))
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        current = Path(env["VERL_FILE_LOGGER_PATH"])
        try:
            with ray_cluster.for_run(cfg, ray_temp_dir(workdir), env, log=log) as address:
                if address:  # n_nodes > 1: the head here, workers on the other nodes through srun
                    env.update(ray_cluster.driver_env(address))
                launch = run_verl(argv, env, saves=saves, progress=lambda: len(verl_preempt.steps_logged(current)),
                                  error_grace_s=error_grace_s)
        except ray_cluster.ClusterError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        rc = launch.rc
        if launch.shm_removed or launch.leftover_pids:
            print(f"[ctpo] after verl: ended {len(launch.leftover_pids)} leftover processes, removed "
                  f"{len(launch.shm_removed)} shared-memory segments ({', '.join(launch.shm_removed) or '-'})",
                  file=sys.stderr, flush=True)
        if saves.reason is not None and latest_step(workdir) < cfg.train.total_steps:
            step = latest_step(workdir)
            saved = f"saved step {step}" if saves.saved_step == step else f"no new checkpoint (last saved step {step})"
            print(f"[ctpo] stopped after '{saves.reason}': {saved}; exiting {saves.exit_code()} so the job is "
                  f"requeued or retried and resumes from step {step} in the same W&B run", file=sys.stderr, flush=True)
            return saves.exit_code()
        if rc != 0 and latest_step(workdir) < cfg.train.total_steps:
            print(f"[ctpo] verl failed at saved step {latest_step(workdir)} (rerun to resume): {launch.error_line()}",
                  file=sys.stderr, flush=True)
            return rc if rc > 0 else 128 - rc
    finalize(cfg, results_dir, workdir, argv)
    return 0


# ----------------------------------------------------------------------------- merging (FSDP -> HF)


def merge_command(workdir: str | Path, step: int, target_dir: str | Path) -> list[str]:
    """verl's model merger on `global_step_{step}/actor` -> an HF dir (weights, config, tokenizer)."""
    actor = layout.workdir(workdir).path("verl_actor", step=step)
    return [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
            "--local_dir", str(actor), "--target_dir", str(target_dir)]


def hf_dir(workdir: str | Path, step: int) -> Path:
    return layout.workdir(workdir).path("hf", step=step)


def merge_checkpoint(workdir: str | Path, step: int) -> Path:
    """Merge step `step` to `<workdir>/hf/step{step}` (written to a temp dir, renamed when complete)."""
    import shutil

    actor = layout.workdir(workdir).path("verl_actor", step=step)
    if not actor.is_dir():
        have = list_checkpoints(workdir)
        raise FileNotFoundError(f"{actor}: no verl checkpoint for step {step} (saved steps: {have})")
    target = hf_dir(workdir, step)
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    from ctpo.hub import set_offline

    # offline like training and evaluation: the checkpoint carries its config and tokenizer
    subprocess.run(merge_command(workdir, step, tmp), check=True, env=set_offline(dict(os.environ)))
    if not (tmp / "config.json").is_file():
        raise VerlRunError(f"{tmp}: verl's model merger wrote no config.json")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctpo.train.verl_backend",
                                description="verl GPU backend: print the training command, train, or merge a checkpoint")
    sub = p.add_subparsers(dest="cmd", required=True)
    helps = {"command": "print the verl command (shell-quoted, one override per line)",
             "run": "run (or resume) verl training, then write metrics.jsonl, provenance.json, done.json"}
    for name in ("command", "run"):
        s = sub.add_parser(name, help=helps[name])
        s.add_argument("--config", required=True, help="resolved run config (.json or .yaml)")
        s.add_argument("--results", required=True, help="results/{exp}/train/{run}/seed{seed}")
        s.add_argument("--workdir", required=True, help="runs/{exp}/{run}/seed{seed}")
        s.add_argument("--init", default=None, help="policy dir to start from (the toy's SFT warm start)")
        s.add_argument("--error-grace-s", type=float, default=verl_preempt.ERROR_GRACE_S,
                       help="after a traceback in verl's output, seconds without a new step before the launch's "
                            "process tree is ended (default %(default)s)")
    m = sub.add_parser("merge", help="merge global_step_N/actor to <workdir>/hf/stepN, then write the marker")
    m.add_argument("--workdir", required=True)
    m.add_argument("--step", type=int, required=True)
    m.add_argument("--done", required=True, help="marker JSON written (atomically) after the merge")
    return p


def cli(args: list[str] | None = None) -> int:
    from ctpo.config import ConfigError

    a = _parser().parse_args(args)
    try:
        if a.cmd == "merge":
            out = merge_checkpoint(a.workdir, a.step)
            write_json(a.done, {"workdir": str(a.workdir), "step": a.step, "hf_dir": str(out)})
            return 0
        cfg = load_run_config(a.config)
        return main(cfg, a.results, a.workdir, print_command=(a.cmd == "command"), init=a.init,
                    error_grace_s=a.error_grace_s)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except (VerlRunError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
