"""python -m ctpo.train --config C.json --results R --workdir W [--init POLICY_DIR] [--print-command]

Dispatches on `train.backend`: `local` -> ctpo.train.local (CPU toy), `verl` -> ctpo.train.verl_backend
(GPU; imported only then). The effective batch sizes are printed and checked before anything starts.
One writer per run: the trainer holds `<workdir>/writer.lock` (ctpo.runlock) while it runs; a second trainer
for the same run exits at once, naming the holder (SLURM job id, host, pid).
Exit codes (ctpo.exitcodes): 0 = done (done.json written; a done run exits at once), 75 = preempted by SIGTERM /
SIGUSR1 after saving a checkpoint (local backend; rerun to resume), 78 = a bad config, a model not on disk,
another trainer holding the run, no CUDA for train.verl_device gpu (a rerun fails the same way: the workflow
does not resubmit it), anything else = failure.
"""
from __future__ import annotations

import argparse
import sys

from ctpo.config import ConfigError, load_run_config
from ctpo.exitcodes import EXIT_PERMANENT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="resolved run config (.json)")
    ap.add_argument("--results", required=True, help="results dir, e.g. results/toy/train/toy_grpo/seed0")
    ap.add_argument("--workdir", required=True, help="checkpoints / rollouts dir, e.g. runs/toy/toy_grpo/seed0")
    ap.add_argument("--init", default=None, help="init policy dir (local: the SFT warm start's policy/)")
    ap.add_argument("--print-command", action="store_true",
                    help="verl: print the training command (its environment, then argv) and exit")
    ap.add_argument("--keep-steps", type=int, nargs="*", default=None,
                    help="verl: checkpoint steps evaluation reads; the others are deleted as training goes (the "
                         "latest is always kept); omitted: keep every checkpoint")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    if args.print_command and cfg.train.backend == "verl":
        from ctpo.train import verl_backend

        return verl_backend.main(cfg, args.results, args.workdir, print_command=True, init=args.init,
                                 keep=args.keep_steps)
    if args.print_command:
        print(f"error: --print-command is for train.backend=verl ({args.config} has '{cfg.train.backend}')",
              file=sys.stderr)
        return EXIT_PERMANENT
    from ctpo.exitcodes import fail_permanent
    from ctpo.runlock import RunLocked, writer_lock

    if cfg.train.backend == "verl":  # takes the lock itself, after its model and CUDA checks
        from ctpo.train import verl_backend

        return verl_backend.main(cfg, args.results, args.workdir, init=args.init, keep=args.keep_steps)
    try:
        with writer_lock(args.workdir, log=lambda m: print(m, file=sys.stderr, flush=True)):
            from ctpo.train import local

            return local.main(cfg, args.results, args.workdir, args.init)
    except RunLocked as e:
        fail_permanent(f"error: {e}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
