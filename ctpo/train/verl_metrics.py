"""verl's file-logger output -> our `metrics.jsonl` (ctpo.schema names), one row per training step.

verl 0.9.1's `FileLogger` (trainer.logger=[..., file], path from VERL_FILE_LOGGER_PATH) writes one line
per `logger.log(data, step)` call: `{"step": N, "data": {key: value}}`. A step may have two lines (the
training metrics and, every test_freq steps, the validation metrics). verl opens the file with "wb", so
each launch writes its own file (`attempt{K}.jsonl`); after a resume the steps since the last checkpoint
are trained again and the later attempt's values win.

Names. verl 0.9.1's trainer prefixes every actor metric (`rename_dict(update_actor metrics, "actor/")`
in verl/trainer/ppo/v1/trainer_base.py), so the plugin's `ctpo/x` arrives as `actor/ctpo/x`; keys that
already start with `actor/` keep their name. Both spellings are read (`actor/` first).

Exact token statistics. verl wraps each loss metric in `Metric(MEAN)` (verl/workers/utils/losses.py
`ppo_loss`): a step's value is the mean over micro-batches (and data-parallel ranks, and mini-batches) of
per-micro-batch values, so a per-micro-batch std or max averaged that way is neither the step's std nor its
max. The plugin therefore also logs token *sums* per micro-batch (`ctpo.metric_sums`: `ctpo/sum/tokens`,
`ctpo/sum/<metric>` = value x tokens, `ctpo/sum/log_rho_cum_sq`); a ratio of two equally-weighted means is
the ratio of the sums, so `exact_token_stats` recovers the step's token-weighted clip fractions, log-ratio
mean, log rho_cum mean and std exactly (every mini-batch has the same number of micro-batches: fixed
micro-batch sizes, `use_dynamic_bsz=false`). A max cannot be recovered from means: on this backend
`ctpo/log_ratio_abs_max` is null and `ctpo/log_ratio_abs_max_lb` (schema.LOG_RATIO_ABS_MAX_LB) holds what verl
reduces the per-micro-batch maxima to, a lower bound on the step's max.

Key mapping (first source present wins; a key that verl and our plugin both lack is written as null):
  train/reward_mean          critic/rewards/mean (= critic/score/mean without a KL penalty)
  train/accuracy             critic/score/mean: ctpo.reward scores are 0/1, so the mean score is the
                             fraction of responses with reward 1
  ctpo/clip_frac (+_low, _high, _active), ctpo/log_ratio_mean, ctpo/log_rho_cum_{mean,std}
                             exact from actor/ctpo/sum/* (our plugin, every method through verl_vanilla /
                             verl_gspo), else actor/ctpo/x or ctpo/x. ctpo/clip_frac (out of band, Figure 2)
                             never takes verl's actor/pg_clipfrac, a different quantity (clip active): that
                             one is ctpo/clip_frac_active's fallback
  train/response_length_mean response_length/mean (all response tokens, observations included)
  train/turns_mean           training/num_turns/mean, num_turns/mean (verl's count, set by the agent loop)
  actor/entropy, actor/grad_norm, actor/pg_loss   same names
  ctpo/log_ratio_mean        ctpo/log_ratio_mean, else -actor/ppo_kl (verl: ppo_kl = mean(old - new) over
                             model tokens, i.e. minus the mean per-token log ratio)
  time/step_s                timing_s/step
  val/{bench}/avg_at_k       val-core/{data_source}/{acc|reward}/mean@{k}; bench = last path part of the
                             data_source (math-ai/aime25 -> aime25), matching data/benchmarks/{bench}.parquet
Keys already named as in TRAIN_KEYS (logged by our plugin / agent loop) pass through unchanged.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ctpo import schema
from ctpo.io import write_text
from ctpo.metric_sums import NOT_AVERAGEABLE, SUM_LOG_RHO_CUM_SQ, SUM_TOKENS, TOKEN_MEAN_KEYS, sum_key

# (our key, [(verl key, sign)]) in priority order after the pass-through of our own names
VERL_SOURCES: dict[str, list[tuple[str, float]]] = {
    schema.REWARD_MEAN: [("critic/rewards/mean", 1.0), ("critic/score/mean", 1.0)],
    schema.ACCURACY: [("critic/score/mean", 1.0)],
    schema.CLIP_FRAC_ACTIVE: [("actor/pg_clipfrac", 1.0)],
    schema.RESPONSE_LENGTH: [("response_length/mean", 1.0)],
    schema.TURNS: [("training/num_turns/mean", 1.0), ("num_turns/mean", 1.0)],
    schema.LOG_RATIO_MEAN: [("actor/ppo_kl", -1.0)],
    schema.STEP_TIME_S: [("timing_s/step", 1.0)],
}
VERL_ACTOR_PREFIX = "actor/"  # verl 0.9.1: rename_dict(actor metrics, "actor/")
def _get(data: dict, key: str):
    """verl's `actor/`-prefixed spelling first, then the bare name."""
    for k in (VERL_ACTOR_PREFIX + key, key):
        v = _num(data.get(k))
        if v is not None:
            return v
    return None


def exact_token_stats(data: dict) -> dict[str, float]:
    """Token-weighted step statistics from the micro-batch-averaged sums; {} when the plugin logged none."""
    tokens = _get(data, SUM_TOKENS)
    if not tokens:
        return {}
    out = {}
    for key in TOKEN_MEAN_KEYS:
        v = _get(data, sum_key(key))
        if v is not None:
            out[key] = v / tokens
    sq = _get(data, SUM_LOG_RHO_CUM_SQ)
    if sq is not None and schema.LOG_RHO_CUM_MEAN in out:
        out[schema.LOG_RHO_CUM_STD] = math.sqrt(max(sq / tokens - out[schema.LOG_RHO_CUM_MEAN] ** 2, 0.0))
    return out


_VAL_RE = re.compile(r"^val-core/(?P<source>.+)/(?P<var>[^/]+)/mean@(?P<k>\d+)$")
_VAL_VAR_PRIORITY = ("acc", "reward", "score")


class VerlLogError(ValueError):
    """A verl log line that is not `{"step": int, "data": {...}}`; the message names file and line."""


def read_verl_log(path: str | Path) -> dict[int, dict]:
    """{step: merged data} of one file-logger file; later lines for a step update earlier ones."""
    path = Path(path)
    steps: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last line cut by a kill: drop it, keep the rest
                break
            raise VerlLogError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or not isinstance(rec.get("data"), dict):
            raise VerlLogError(f"{path}:{i}: expected {{'step': int, 'data': {{...}}}}")
        steps.setdefault(rec["step"], {}).update(rec["data"])
    return steps


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _val_metrics(data: dict) -> dict[str, float]:
    found: dict[str, dict[str, float]] = {}
    for key, value in data.items():
        m = _VAL_RE.match(key)
        if m and _num(value) is not None:
            bench = m["source"].rstrip("/").split("/")[-1]
            found.setdefault(bench, {})[m["var"]] = _num(value)
    out = {}
    for bench, by_var in sorted(found.items()):
        for var in _VAL_VAR_PRIORITY:
            if var in by_var:
                out[f"{schema.VAL_PREFIX}{bench}/avg_at_k"] = by_var[var]
                break
    return out


def convert_step(step: int, data: dict) -> dict:
    """One metrics.jsonl row: every TRAIN_KEYS key (null when absent) plus val/{bench}/avg_at_k."""
    row: dict = {schema.STEP: step}
    exact = exact_token_stats(data)
    for key in schema.TRAIN_KEYS:
        if key == schema.STEP:
            continue
        value = exact.get(key)
        if value is None and key not in NOT_AVERAGEABLE:
            value = _get(data, key)
        if value is None:
            for src, sign in VERL_SOURCES.get(key, []):
                v = _num(data.get(src))
                if v is not None:
                    value = sign * v + 0.0  # + 0.0: no -0.0
                    break
        row[key] = value
    lb = _get(data, schema.LOG_RATIO_ABS_MAX_LB)
    if lb is not None:
        row[schema.LOG_RATIO_ABS_MAX_LB] = lb
    row.update(_val_metrics(data))
    return row


def convert_logs(paths: list[Path], out_path: str | Path) -> int:
    """Merge the attempts' logs (later files win per step) into `out_path`; returns the number of rows."""
    merged: dict[int, dict] = {}
    for p in paths:
        for step, data in read_verl_log(p).items():
            if step in merged and data.keys() & merged[step].keys():
                merged[step] = dict(data)  # a re-trained step after a resume replaces the lost attempt's values
            else:
                merged.setdefault(step, {}).update(data)
    rows = [convert_step(s, merged[s]) for s in sorted(merged) if s >= 1]
    write_text(out_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return len(rows)
