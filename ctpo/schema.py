"""One place for the data contracts: metric names (metrics.jsonl), rollout-dump arrays, evaluation columns and
diagnostics columns. Both training backends, evaluation, diagnostics and reports use these names, so figures
never care which backend ran.

Where each file lives is `ctpo.layout` (path templates of results/, runs/, data/, logs/, figures/, the
done.json record, the saved-steps rule); its main names are re-exported here. Kept apart so that each module
holds one kind of fact: what a file contains (here) and where it is (there).
"""
from __future__ import annotations

from ctpo.layout import TEMPLATES, TrainDone, read_done, saved_steps, templates, write_done  # noqa: F401

# ---------------------------------------------------------------- per-step training metrics (metrics.jsonl)
STEP = "step"
REWARD_MEAN = "train/reward_mean"
ACCURACY = "train/accuracy"  # fraction of responses with reward 1
CLIP_FRAC = "ctpo/clip_frac"  # fraction of model tokens whose ratio is outside its bounds (see losses.py)
CLIP_FRAC_LOW = "ctpo/clip_frac_low"  # ... below the lower bound with A < 0
CLIP_FRAC_HIGH = "ctpo/clip_frac_high"  # ... above the upper bound with A > 0
# clip active (low + high): the release's / verl's actor/pg_clipfrac quantity, Figure 2's clip fraction (panel b);
# CLIP_FRAC (out of band) is its panel c
CLIP_FRAC_ACTIVE = "ctpo/clip_frac_active"
DUAL_CLIP_FRAC = "ctpo/dual_clip_frac"  # model tokens with A < 0 whose loss the dual clip caps
RESPONSE_LENGTH = "train/response_length_mean"  # tokens per response, observations included
MODEL_TOKENS = "train/model_tokens_mean"  # model-generated tokens per response
TURNS = "train/turns_mean"
TOOL_CALLS = "train/tool_calls_mean"
ENTROPY = "actor/entropy"
GRAD_NORM = "actor/grad_norm"
PG_LOSS = "actor/pg_loss"
LOG_RATIO_MEAN = "ctpo/log_ratio_mean"  # per-token log r_t over model tokens
LOG_RATIO_ABS_MAX = "ctpo/log_ratio_abs_max"
LOG_RHO_CUM_MEAN = "ctpo/log_rho_cum_mean"
LOG_RHO_CUM_STD = "ctpo/log_rho_cum_std"
# verl backend only (not in TRAIN_KEYS): verl averages loss metrics over micro-batches, so the step's true
# max |log r_t| is lost (LOG_RATIO_ABS_MAX is null there); this is the largest per-mini-batch mean of the
# per-micro-batch maxima, a lower bound on it (ctpo.train.verl_metrics)
LOG_RATIO_ABS_MAX_LB = "ctpo/log_ratio_abs_max_lb"
STEP_TIME_S = "time/step_s"
VAL_PREFIX = "val/"  # val/{benchmark}/avg_at_k when a validation ran at this step

TRAIN_KEYS = (
    STEP, REWARD_MEAN, ACCURACY, CLIP_FRAC, CLIP_FRAC_LOW, CLIP_FRAC_HIGH, CLIP_FRAC_ACTIVE, RESPONSE_LENGTH, MODEL_TOKENS,
    TURNS, TOOL_CALLS, ENTROPY, GRAD_NORM, PG_LOSS, LOG_RATIO_MEAN, LOG_RATIO_ABS_MAX,
    LOG_RHO_CUM_MEAN, LOG_RHO_CUM_STD, STEP_TIME_S,
)

# ---------------------------------------------------------------- rollout dumps (layout: rollout)
# old_log_prob, log_prob: float32 (N, T), log-probs of each response token under the behaviour policy and
#   under the policy the loss saw at that response's mini-batch update; response_mask: int8 (N, T),
#   1 = model token, 0 = observation / padding; advantages: float32 (N,).
ROLLOUT_ARRAYS = ("old_log_prob", "log_prob", "response_mask", "advantages")

# ---------------------------------------------------------------- evaluation records
EVAL_COLUMNS = {
    "problem_id": "str",
    "sample_index": "int64",
    "ground_truth": "str",
    "extracted_answer": "str",  # "" when extraction failed
    "extraction_failed": "bool",
    "correct": "bool",  # the verdict of the run's grader (reward.grader, named in `grader`)
    "grader": "str",
    "correct_release": "bool",  # every grader's verdict (ctpo.grading.GRADERS), whichever the run uses
    "correct_strict": "bool",
    "turns": "int64",
    "tool_calls": "int64",
    "response_length": "int64",  # tokens, observations included
}
# The sidecar JSON holds: experiment, run, seed, step, benchmark, label, k, n_problems, avg_at_k,
# pass_at_k {k: value}, ci95 [lo, hi], extraction_failure_rate, grader (whose verdicts `avg_at_k` counts),
# avg_at_k_by_grader {grader: avg@k}, and provenance: checkpoint, backend,
# backend_version, torch_version, tp_size, dtype, sampling {temperature, top_p, max_tokens, max_turns},
# prompt_template_hash, benchmark_sha256, git_commit.

# ---------------------------------------------------------------- diagnostics (per position bin)
DIAG_COLUMNS = (
    "t_lo",  # first position in the bin (1-based model-token index)
    "t_hi",  # last position in the bin
    "t_mid",  # token-weighted mean position in the bin (where the sigma_hat * sqrt(t) fit is evaluated)
    "n_tokens",  # model tokens that fell in the bin
    "std_log_rho_cum",  # empirical std of log rho_cum over sequences alive at t (pooled in the bin)
    "clip_rate_fixed",  # fraction with rho_cum outside [0.5, 5]
    "clip_rate_adaptive",  # fraction with log rho_cum outside [-eps_low t^p, eps_high t^p]
)
