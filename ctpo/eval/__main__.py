"""avg@k evaluation of one checkpoint on one benchmark through the TIR agent loop.

    python -m ctpo.eval --config results/toy/configs/toy_ctpo/seed0.json \\
        --checkpoint runs/toy/toy_ctpo/seed0/checkpoints/step10/policy \\
        --benchmark data/toy/toy_arith.parquet --step 10 \\
        --out results/toy/eval/toy_ctpo/seed0/step10/toy_arith.parquet [--backend auto|hf|vllm]

Writes `<out>` (per-sample records, columns `ctpo.schema.EVAL_COLUMNS`) and `<out>.json` beside it
(scores + provenance; keys listed in ctpo/schema.py), both atomically. k, temperature, top_p,
max_problems, tp_size and chunk_size come from cfg.eval; turn / token limits and the template from
cfg.rollout; seeds from (cfg.seed, step, benchmark). Finished chunks are kept in
`<out stem>.partial.parquet`, so a rerun after an interruption draws only what is missing.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ctpo.config import ConfigError, config_hash, load_run_config
from ctpo.exitcodes import EXIT_PERMANENT, fail_permanent
from ctpo.eval import backend as B
from ctpo.eval import metrics, runner
from ctpo.io import sha256_file, write_json, write_parquet
from ctpo.seeding import seed_everything

log = logging.getLogger("ctpo.eval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctpo.eval", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="resolved run config (.json from rule run_config)")
    p.add_argument("--checkpoint", required=True, help="policy directory (HF save_pretrained) or hub id")
    p.add_argument("--benchmark", required=True, help="benchmark parquet in verl's schema")
    p.add_argument("--step", required=True, type=int, help="training step of the checkpoint")
    p.add_argument("--out", required=True, help="records .parquet (ctpo.layout 'eval'); the summary goes beside it")
    p.add_argument("--backend", default="auto", choices=B.BACKENDS)
    return p.parse_args(argv)


def sidecar_path(out: Path) -> Path:
    """The summary beside the records: ctpo.layout's 'eval_json' for its 'eval' (tests/test_layout.py)."""
    return out.with_suffix(".json")


def eval_provenance(cfg, cfg_dict: dict, args, backend: str, benchmark_sha: str) -> dict:
    """What changes scores (rllm#12, open-r1#674), recorded with every result."""
    import torch

    from ctpo.agent.protocols import protocol_hash
    from ctpo.provenance import git_state, hardware

    git = git_state()
    return {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": B.weights_sha256(args.checkpoint),
        "backend": backend,
        "backend_version": B.backend_version(backend),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "tp_size": cfg.eval.tp_size,
        "dtype": cfg.model.dtype,
        "sampling": {
            "temperature": cfg.eval.temperature,
            "top_p": cfg.eval.top_p,
            "max_tokens": cfg.rollout.max_response_tokens,
            "max_turns": cfg.rollout.max_turns,
            "max_obs_tokens": cfg.rollout.max_obs_tokens,
            "enable_thinking": cfg.rollout.enable_thinking,
        },
        "tool_protocol": cfg.rollout.protocol,
        "prompt_template": cfg.rollout.template,
        # what the model sees: the TIR template (ctpo_tir) or the release's system prompt + tool config
        "prompt_template_hash": protocol_hash(cfg.rollout.protocol, cfg.rollout.template),
        "benchmark_file": str(args.benchmark),
        "benchmark_sha256": benchmark_sha,
        "chunk_size": cfg.eval.chunk_size,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "config_hash": config_hash(cfg_dict),
        "hardware": hardware(),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ctpo.hub import MissingLocalFiles, require_model, set_offline

    set_offline()  # compute nodes are offline: the checkpoint and its tokenizer are local files
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    try:  # a missing checkpoint (or the base model not fetched at model.revision) stops here, in one line
        model_dir = str(require_model(args.checkpoint,
                                      cfg.model.revision if args.checkpoint == cfg.model.path else None))
    except MissingLocalFiles as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT  # the checkpoint (or the model at its revision) is not on disk: a rerun cannot fix it
    try:  # before loading anything: a GPU job without its GPU stack stops here (exit 78, never retried)
        backend = B.resolve_backend(args.backend)
    except ValueError as e:
        fail_permanent(f"error: {e}")
    cfg_dict = asdict(cfg)
    out = Path(args.out)
    bench = Path(args.benchmark).stem
    seed_parts = (cfg.seed, args.step, bench)
    seed_everything(runner.derive_seed(*seed_parts))
    t0 = time.time()

    problems = runner.load_benchmark(args.benchmark, cfg.eval.max_problems)
    benchmark_sha = sha256_file(args.benchmark)
    prov = eval_provenance(cfg, cfg_dict, args, backend, benchmark_sha)
    fp = runner.fingerprint({
        "checkpoint": prov["checkpoint"], "checkpoint_sha256": prov["checkpoint_sha256"], "backend": backend,
        "benchmark_sha256": benchmark_sha, "problems": [p.problem_id for p in problems], "k": cfg.eval.k,
        "eval": cfg_dict["eval"], "rollout": cfg_dict["rollout"], "seed_parts": seed_parts,
        "template": prov["prompt_template_hash"], "dtype": cfg.model.dtype, "grader": cfg.reward.grader,
    })
    log.info("%s: %d problems x k=%d on %s (%s), checkpoint %s", bench, len(problems), cfg.eval.k,
             backend, prov["backend_version"], args.checkpoint)

    from ctpo.agent import SamplingParams, run_episodes
    from ctpo.grading import GRADERS, correct_column, grade_all
    from ctpo.sandbox import SandboxPool

    generator, tokenizer = B.build_generator(backend, model_dir, cfg)
    plan = runner.EvalPlan(problems, cfg.eval.k, cfg.eval.chunk_size, seed_parts, fp)
    partial = runner.partial_path(out)
    # fails closed here (SandboxUnavailable), before any generation, when isolation is not available
    with SandboxPool.for_rollout(cfg.rollout) as pool:
        prov["sandbox_isolation"] = pool.mode

        if cfg.rollout.protocol == "release":  # the training loop's own class (ctpo.agent.release_episodes)
            from ctpo.agent.release_episodes import release_rollout

            run = release_rollout(generator, tokenizer, cfg.rollout, pool, model_dir)
        else:
            def run(questions, params):
                return run_episodes(generator, tokenizer, questions, cfg.rollout, params, sandbox=pool)

        def rollout(questions: list[str], seed: int) -> list:
            params = SamplingParams(
                temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                max_new_tokens=cfg.rollout.max_response_tokens, seed=seed,
            )
            return run(questions, params)

        records = runner.evaluate(plan, rollout, grade_all(cfg.reward.grader), partial)
    summary = metrics.summarize(records, cfg.eval.k, source=str(out), seed=runner.derive_seed(*seed_parts, "ci"))
    by_grader = {g: metrics.avg_at_k(metrics.correct_counts(records.assign(correct=records[correct_column(g)]))["c"],
                                     cfg.eval.k) for g in GRADERS}
    summary.update({
        "grader": cfg.reward.grader, "avg_at_k_by_grader": by_grader,
        "experiment": cfg.experiment, "run": cfg.run, "seed": cfg.seed, "step": args.step,
        "benchmark": bench, "label": cfg.label,
        "turns_mean": float(records["turns"].mean()),
        "tool_calls_mean": float(records["tool_calls"].mean()),
        "response_length_mean": float(records["response_length"].mean()),
        "wall_s": round(time.time() - t0, 3),
        "provenance": prov,
    })
    write_parquet(out, records)
    write_json(sidecar_path(out), summary)
    partial.unlink(missing_ok=True)
    log.info("%s step %d: avg@%d = %.4f  95%% CI [%.4f, %.4f] (%s grader; %s)  extraction failures %.1f%%", bench,
             args.step, cfg.eval.k, summary["avg_at_k"], *summary["ci95"], cfg.reward.grader,
             ", ".join(f"{g} {v:.4f}" for g, v in by_grader.items()), 100 * summary["extraction_failure_rate"])
    if summary["extraction_failure_rate"] > 0.5:
        log.warning("%s: no answer could be extracted from %.0f%% of samples: check the template, the token "
                    "budget and the checkpoint", bench, 100 * summary["extraction_failure_rate"])
    return 0  # W&B: `python -m ctpo.reports wandb` logs every evaluation as a curve per (run, seed)


if __name__ == "__main__":
    sys.exit(main())
