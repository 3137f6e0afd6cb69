"""The verl command of a run, built once: `verl_command(cfg, workdir, launch)` -> (argv, environment) of
`python -m verl.trainer.main_ppo` (verl 0.9.1) with the paper's setup (arXiv 2605.07331, Sec. 4.1; the authors'
released launcher). A pure function of the resolved run config (its checks: `ctpo.config.validate_run_config`),
the run's workdir and what one launch adds (`Launch`: attempt, resumed step, W&B id and mode, kept steps); the
launcher (`ctpo.train.verl_backend`) reads those from the workdir, runs, resumes and finalizes.
`python -m ctpo.train --print-command` prints it.

Every value comes from the run config (verl-only settings: `train.verl`), so it is in the run identity. The
literals left are contracts this launcher and our plugin rely on (GRPO advantages, no reward KL, decoupled
rollout IS, fixed micro-batches, behaviour log-probs, resumable checkpoints, multi-turn TIR, our reward and save
hook), and the device keys of the `cpu` profile (`train.verl_device: cpu`, ctpo.train.verl_cpu). Every path and
free-text value is Hydra-quoted (`ctpo.config.hydra_quote`): config values are data.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ctpo import layout
from ctpo.config import CONFIG_DIR, PROTOCOLS, REPO_ROOT, RunConfig, hydra_quote

VERL_MAIN = "verl.trainer.main_ppo"
REWARD_FN = "compute_score"
HYDRA_DIR = "hydra"  # <workdir>/hydra: Hydra's run dir for verl's main_ppo (its .hydra/ config and log)
_RAY_TMP_MAX = 32  # Ray's unix socket paths (<tmp>/session_<date>_<pid>/sockets/...) must stay < 108 chars


@dataclass(frozen=True)
class Launch:
    """What one launch of a run adds to its config; the launcher reads it from the workdir
    (`ctpo.train.verl_backend.launch_state`)."""

    wandb_run_id: str  # reused on requeue (WANDB_RESUME=allow): one W&B run per run identity
    wandb_mode: str  # online | offline | disabled: the mode this launch logs in
    attempt: int = 1  # verl's file logger writes W/verl_logs/attempt{attempt}.jsonl
    resumed_step: int = 0  # verl's last saved step: rollout dumps count steps from the one after it
    keep: tuple[int, ...] | None = None  # checkpoint steps evaluation reads (ctpo.train.retention); None: all


def _q(path: str | Path) -> str:
    """A Hydra-quoted absolute path ('=', ',', spaces, quotes and `${..}` stay text)."""
    return hydra_quote(str(Path(path).resolve()))


def _b(x: bool) -> str:
    return "true" if x else "false"


def checkpoint_dir(workdir: str | Path) -> Path:
    return layout.workdir(workdir).path("checkpoints")


def agent_loop_path(workdir: str | Path) -> Path:
    """The run's copy of configs/verl/agent_loop.yaml (`verl_backend.write_agent_loop_config`)."""
    return layout.workdir(Path(workdir).resolve()).path("agent_loop")


def ray_temp_dir(workdir: str | Path) -> Path:
    """`<workdir>/ray` when short enough for Ray's socket paths and plain (main_ppo reads it before it resolves
    its config, so it must need no escaping), else /tmp/ctpo-ray-<hash of workdir>."""
    p = Path(workdir).resolve() / "ray"
    if len(str(p)) <= _RAY_TMP_MAX and re.fullmatch(r"[A-Za-z0-9_./-]+", str(p)):
        return p
    return Path("/tmp") / f"ctpo-ray-{hashlib.sha256(str(p).encode()).hexdigest()[:10]}"


def experiment_name(cfg: RunConfig) -> str:
    """verl's `trainer.experiment_name` = the W&B run name (as ctpo.tracking names local runs)."""
    return f"{cfg.run}-seed{cfg.seed}"


def reward_module(grader: str) -> str:
    """verl's reward.custom_reward_function.path for `reward.grader`: a package path, not a file (verl loads a
    file without registering the module in sys.modules, so the @dataclass in ctpo/reward.py fails at import)."""
    from ctpo import grading

    return f"pkg://{grading.module(grader)}"


def loss_calls_per_step(cfg: RunConfig) -> int:
    """Policy-loss calls per rank per training step (fixed micro-batches, no dynamic bsz): one per micro-batch
    and PPO epoch (a dump step's shard holds every epoch's calls). The even split is checked by
    `ctpo.config.validate_run_config`."""
    t = cfg.train
    return t.prompts_per_step * cfg.rollout.n // (t.n_gpus * t.n_nodes) // t.micro_batch_size_per_gpu * t.verl.ppo_epochs


def _protocol(cfg: RunConfig, workdir: Path, ro: str) -> list[str]:
    """Agent loop, tool parser and tool config of `rollout.protocol` (docs/TOOL_PROTOCOL.md)."""
    from ctpo.agent import protocols

    loop, tools = PROTOCOLS[cfg.rollout.protocol]
    out = [f"{ro}.agent.agent_loop_config_path={_q(agent_loop_path(workdir))}",
           f"{ro}.multi_turn.tool_config_path={_q(CONFIG_DIR / tools)}",
           f"{ro}.agent.default_agent_loop={loop}"]
    if cfg.rollout.protocol == "release":  # ctpo_tir: verl's default format (hermes); our loop ignores it
        out += [f"{ro}.multi_turn.format={protocols.RELEASE_PARSER}",
                f"{ro}.multi_turn.max_parallel_calls={protocols.RELEASE_MAX_PARALLEL_CALLS}",
                f"{ro}.multi_turn.tool_response_truncate_side={protocols.RELEASE_TRUNCATE_SIDE}"]
    return out


def _cpu_device(cfg: RunConfig) -> list[str]:
    """The `cpu` profile's device keys (ctpo.train.verl_cpu), after the paper run's: keys the paper run leaves
    at verl's defaults. The train.verl values it needs are the config's (ctpo.config.CPU_PROFILE_VERL)."""
    from ctpo.train import verl_cpu

    a, m, ro = "actor_rollout_ref.actor", "actor_rollout_ref.model", "actor_rollout_ref.rollout"
    if cfg.train.verl_cpu_rollout == "hf":
        engine = [f"{ro}.free_cache_engine=false"]
    else:
        engine = [
            f"+{ro}.enable_sleep_mode=false",  # CUDA memory pools only (a RolloutConfig field, not in its yaml)
            f"{ro}.free_cache_engine=false",
            f"{ro}.enforce_eager=true",  # no CUDA graphs, no torch.compile of the model
            f"{ro}.dtype=float32",  # the trainer's dtype here: rollout and trainer log-probs agree
            f"{ro}.enable_chunked_prefill=false",  # vLLM 0.24's CPU sampler fails on a split seeded prefill
            f"+{ro}.engine_kwargs.vllm.worker_extension_cls={verl_cpu.VLLM_WORKER_EXTENSION}",
        ]
    return [
        f"+{m}.override_config.attn_implementation=eager",  # verl's default is flash_attention_2
        f"{a}.strategy=fsdp2",  # FSDP1 refuses CPU parameters with sync_module_states
        f"{a}.fsdp_config.use_torch_compile=false",
        f"{a}.use_torch_compile=false",
        f"{a}.fsdp_config.dtype=float32",
        # no bf16 autocast (verl's FSDP engine defaults param_dtype to bf16): the trainer's log-probs equal
        # the fp32 rollout server's, so rollout IS weights are 1 up to float rounding
        f"+{a}.fsdp_config.mixed_precision={{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}}",
        *engine,
        "trainer.device=cpu",
        # the logical "GPU" resources verl's pools ask for
        f"+ray_kwargs.ray_init.num_gpus={cfg.train.n_gpus * cfg.train.n_nodes}",
        # Ray's CPU count is logical: verl's and TransferQueue's actors reserve 1 each (task runner, TQ
        # controller, storage units, reward workers); with the detected 2 they wait on each other forever
        f"ray_kwargs.ray_init.num_cpus={verl_cpu.RAY_LOGICAL_CPUS}",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",  # default 8 processes
        f"{ro}.agent.num_workers=1",  # agent-loop worker processes (default 8)
        "reward.num_workers=1",  # reward worker processes (default 8)
        "data.dataloader_num_workers=0",
    ]


def _overrides(cfg: RunConfig, workdir: Path, init: str | Path | None, loggers: str) -> list[str]:
    """Hydra overrides: the paper's setup, the loss (ctpo.verl_plugin), the device profile's keys."""
    from ctpo.train import ray_cluster, verl_preempt
    from ctpo.verl_plugin import verl_overrides

    t, r, v = cfg.train, cfg.rollout, cfg.train.verl
    cpu = t.verl_device == "cpu"
    model_path = str(Path(init).resolve()) if init else cfg.model.path
    val = "[" + ",".join(_q(f) for f in cfg.data.val) + "]"
    a, ro = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    argv = [
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
        # model (our plugin, `external_lib`, comes with the loss keys: ctpo.verl_plugin.verl_overrides)
        f"actor_rollout_ref.model.path={hydra_quote(model_path)}",
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
        # rollout: vLLM async server (the cpu profile's hf engine: a transformers-generate server), behaviour
        # log-probs for rollout IS
        f"{ro}.name={t.verl_cpu_rollout if cpu else 'vllm'}",
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
        *_protocol(cfg, workdir, ro),
        # reward: reward.grader's scorer (ctpo.grading), for training and validation alike
        f"reward.custom_reward_function.path={reward_module(cfg.reward.grader)}",
        f"reward.custom_reward_function.name={REWARD_FN}",
        # trainer: nodes x GPUs, steps, save + validate frequencies, resume from our workdir
        f"trainer.nnodes={t.n_nodes}",
        f"trainer.n_gpus_per_node={t.n_gpus}",
        f"trainer.total_training_steps={t.total_steps}",
        f"trainer.save_freq={t.save_freq}",
        f"trainer.test_freq={t.test_freq}",
        f"trainer.val_before_train={_b(v.val_before_train)}",
        "trainer.resume_mode=auto",
        f"trainer.checkpoint_callback_class={verl_preempt.HOOK_CLASS}",  # save on signal / before the end time
        f"trainer.default_local_dir={_q(checkpoint_dir(workdir))}",
        f"trainer.project_name={hydra_quote(cfg.wandb.project)}",
        f"trainer.experiment_name={hydra_quote(experiment_name(cfg))}",
        f"trainer.logger={loggers}",
        # Ray: a private local cluster per job (own temp dir, dynamic ports, no dashboard port clash)
        f"+ray_kwargs.ray_init._temp_dir={_q(ray_temp_dir(workdir))}",
        "+ray_kwargs.ray_init.include_dashboard=false",
        # Hydra: its run dir (.hydra/ composed config, main_ppo.log) in the workdir, not ./outputs/<date> in the cwd
        f"hydra.run.dir={_q(workdir / HYDRA_DIR)}",
        *verl_overrides(cfg.loss),
        *(_cpu_device(cfg) if cpu else []),
    ]
    if t.n_nodes > 1:  # verl joins the job's Ray cluster (ctpo.train.ray_cluster), which has its ray_init set
        argv = ray_cluster.drop_cluster_keys(argv)
    return argv


def _environment(cfg: RunConfig, workdir: Path, launch: Launch, base: dict[str, str]) -> dict[str, str]:
    """`base` with W&B resume, verl's file-logger path, the rollout-dump contract, the save-request file, the
    kept checkpoints, offline hubs and the device profile's variables; never a foreign Ray or W&B service."""
    from ctpo.hub import OFFLINE_ENV
    from ctpo.tracking import wandb_group
    from ctpo.train import retention, verl_cpu, verl_preempt

    wd = layout.workdir(workdir)
    env = dict(base)
    env.pop("RAY_ADDRESS", None)  # never attach to somebody else's cluster
    env.pop("WANDB_SERVICE", None)  # nor to a parent's W&B service: it would keep a killed attempt's run open
    env.update({"WANDB_RUN_ID": launch.wandb_run_id, "WANDB_RESUME": "allow",
                "WANDB_RUN_GROUP": wandb_group(asdict(cfg)),  # the local trainer's and the reports' group
                "WANDB_DIR": str(workdir)})
    if launch.wandb_mode != "disabled":
        env["WANDB_MODE"] = launch.wandb_mode
    if cfg.wandb.entity:
        env["WANDB_ENTITY"] = cfg.wandb.entity
    env.update({
        "VERL_FILE_LOGGER_PATH": str(wd.path("verl_log", attempt=launch.attempt)),
        "CTPO_DUMP_DIR": str(wd.path("rollout_shards")),
        "CTPO_DUMP_STEPS": ",".join(str(s) for s in cfg.train.dump_steps),
        "CTPO_DUMP_START_STEP": str(launch.resumed_step + 1),
        "CTPO_DUMP_CALLS_PER_STEP": str(loss_calls_per_step(cfg)),
        verl_preempt.ENV_REQUEST: str(verl_preempt.request_path(workdir)),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    if cfg.train.verl_device == "cpu":
        env.update({"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": verl_cpu.REGISTRY_MODULE,
                    "TOKENIZERS_PARALLELISM": "false"})
        if cfg.train.verl_cpu_rollout == "vllm":
            from ctpo.agent.vllm_generator import CPU_ENV

            env.update(CPU_ENV)
    env.update(OFFLINE_ENV)  # compute nodes are offline: the model and data are on disk
    env.update(retention.env_value(None if launch.keep is None else list(launch.keep)))
    return env


def verl_command(cfg: RunConfig, workdir: str | Path, launch: Launch, init: str | Path | None = None,
                 base_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one verl launch of run `cfg` in `workdir`: `python -m verl.trainer.main_ppo
    <overrides>` and `base_env` (default: none) with the run's variables. init: the policy dir to start from
    (the toy's SFT warm start, or the verified local snapshot of `model.revision`), else `model.path`."""
    workdir = Path(workdir).resolve()
    if "${" in str(workdir):  # Hydra interpolates its own run dir and log paths: no escape holds
        raise ValueError(f"--workdir {workdir}: a path holding '${{' cannot be verl's (Hydra's) run dir; choose another")
    if not init and not cfg.model.path:
        raise ValueError(f"model '{cfg.model.name}' (kind {cfg.model.kind}) has no model.path: pass --init POLICY_DIR "
                         "(the toy's SFT warm start)")
    loggers = ["console", "file"]  # file: verl's FileLogger -> VERL_FILE_LOGGER_PATH (our metrics source)
    if launch.wandb_mode != "disabled":
        loggers.append("wandb")
    argv = [sys.executable, "-m", VERL_MAIN, *_overrides(cfg, workdir, init, "[" + ",".join(loggers) + "]")]
    return argv, _environment(cfg, workdir, launch, dict(base_env or {}))


def format_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Shell-quoted, one override per line; with `env`, its variables first (`VAR=value \\`)."""
    head = " ".join(shlex.quote(a) for a in argv[:3])
    lines = [f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
    return " \\\n    ".join([*lines, head, *(shlex.quote(a) for a in argv[3:])]) + "\n"
