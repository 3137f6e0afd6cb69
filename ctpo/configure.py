"""Experiment-level planning for the workflow, and the `python -m ctpo.configure` writer.

The Snakemake rules (`workflow/rules/*.smk`) call these functions at parse time; none of them imports
Snakemake, so the plan is testable on its own:

- `check_schema(experiment, schema)` the JSON schema (workflow/schemas), its first violation as one line
- `resolve_runs(experiment)`        every (run, seed) -> resolved RunConfig dict (`ctpo.config.resolve_run`)
- `check_experiment(experiment)`    `ctpo.config.check_experiment` (names, steps) and Figure 1's bands (ctpo.diagnostics.bands)
- `eval_targets(experiment, runs)`  the (run, seed, step, benchmark) evaluations the tables and figures need
- `warmstart_config(experiment, seed)`  the toy SFT's config, independent of any method's loss
- `on_gpu(run)`, `eval_backend(run)`, `keep_steps(...)`  what a run's GPU jobs need and what its training keeps

CLI (atomic writes through `ctpo.io`):

    python -m ctpo.configure --json '<canonical json>' --out <a config file of ctpo.layout, e.g. run_config>
    python -m ctpo.configure --checksums data/toy/*.parquet --out <ctpo.layout data_toy>
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ctpo import config
from ctpo.config import CONFIG_DIR, ConfigError, LossConfig, resolve_run
from ctpo.diagnostics.bands import experiment_bands
from ctpo.io import sha256_file, write_json
from ctpo.layout import saved_steps

# The warm start trains no policy loss: its config's loss is all null (method null), so that no method file
# (configs/methods/*.yaml) can change it.
WARMSTART_RUN = "sft"


def check_schema(experiment: dict, schema_path: str | Path) -> None:
    """ConfigError (one line: the key, the value, what the schema expects) on the first schema violation.
    The rules live in the schema only; this reports them before anything is planned or run."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(experiment))
    if error is None:
        return
    key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in error.absolute_path).lstrip(".") or "(top)"
    if error.validator == "propertyNames":  # a mapping key: name it and the rule it broke
        error = jsonschema.exceptions.best_match(error.context) or error
    if error.validator == "oneOf" and error.context:  # a value that is neither a revision nor null, say
        error = jsonschema.exceptions.best_match(error.context)
    expected = ""
    if error.validator == "pattern":  # the pattern's own words: the description beside it in the schema
        expected = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
    message = " ".join(error.message.split())[:300]
    raise ConfigError(f"experiment config {key}: {message}" + (f"; expected {expected}" if expected else "")
                      + f" ({Path(schema_path).name})")


def resolve_runs(experiment: dict, config_dir: Path = CONFIG_DIR) -> dict[tuple[str, int], dict]:
    """{(run, seed): resolved run config} for every run in `experiment['runs']` and every seed;
    `config_dir` holds models/ and methods/ (the workflow passes its own checkout's configs/)."""
    return {
        (run, int(seed)): resolve_run(experiment, run, int(seed), config_dir)
        for run in experiment["runs"]
        for seed in experiment["seeds"]
    }


def final_step(run_cfg: dict) -> int:
    return int(run_cfg["train"]["total_steps"])


def check_experiment(experiment: dict, resolved: dict[tuple[str, int], dict], config_dir: Path = CONFIG_DIR) -> None:
    """The experiment's cross-key checks (`ctpo.config.check_experiment`: names, Table 3's pair, dumped diagnostics
    steps), and Figure 1's bands resolve (`ctpo.diagnostics.bands.experiment_bands`)."""
    config.check_experiment(experiment, resolved)
    experiment_bands(experiment, resolved)


def eval_targets(experiment: dict, resolved: dict[tuple[str, int], dict]) -> list[tuple[str, int, int, str]]:
    """Sorted, de-duplicated (run, seed, step, benchmark) evaluations:

    Tables 2-3: the final checkpoint of every table run on every `table2_benchmarks` entry.
    Figure 2:   `figure2_benchmark` at every saved step (`ctpo.layout.saved_steps`) of every `figure2_runs` entry.
    """
    ev = experiment["evaluation"]
    out: set[tuple[str, int, int, str]] = set()
    for seed in (int(s) for s in experiment["seeds"]):
        for run in list(ev["table2_runs"]) + list(ev["table3_runs"]):
            for bench in ev["table2_benchmarks"]:
                out.add((run, seed, final_step(resolved[(run, seed)]), bench))
        for run in ev["figure2_runs"]:
            train = resolved[(run, seed)]["train"]
            for step in saved_steps(train["total_steps"], train["save_freq"]):
                out.add((run, seed, step, ev["figure2_benchmark"]))
    return sorted(out)


def on_gpu(run_cfg: dict) -> bool:
    """A run whose jobs need the GPU stack: verl on the `gpu` device (the paper), not the toy's CPU profiles."""
    train = run_cfg["train"]
    return train["backend"] == "verl" and train["verl_device"] == "gpu"


def eval_backend(run_cfg: dict) -> str:
    """`python -m ctpo.eval --backend` for a run: `vllm` for a GPU run (required: no silent HF fallback inside a
    GPU job), `auto` for the toy (HF generate on CPU)."""
    return "vllm" if on_gpu(run_cfg) else "auto"


def keep_steps(targets: list[tuple[str, int, int, str]], run: str, seed: int) -> list[int]:
    """The checkpoint steps evaluation reads for (run, seed) (`eval_targets`): training keeps these (and the
    latest, for resume) and deletes the rest as it goes (`ctpo.train.retention`)."""
    return sorted({step for r, s, step, _ in targets if r == run and s == seed})


def warmstart_config(experiment: dict, seed: int, config_dir: Path = CONFIG_DIR) -> dict:
    """The toy SFT warm start's config: experiment defaults + the shared model, with no run's overrides and
    no method file in it (`loss` is all null: no policy loss), so editing one method or one run never
    retrains the warm start that every toy-model run (either backend) starts from.

    Every toy-model run must resolve to the same model section."""
    local = {}
    for run in experiment["runs"]:
        cfg = resolve_run(experiment, run, seed, config_dir)
        if cfg["model"]["kind"] == "toy":
            local[run] = cfg
    if not local:
        raise ConfigError(f"experiment '{experiment['experiment']}': no run uses a toy model (model.kind toy); "
                          "no warm start")
    models = {json.dumps(c["model"], sort_keys=True) for c in local.values()}
    if len(models) > 1:
        raise ConfigError(
            f"experiment '{experiment['experiment']}': toy-model runs {sorted(local)} use different models; "
            "the toy warm start is shared per seed, so they must agree"
        )
    first = next(iter(local))
    spec = {"model": experiment["runs"][first]["model"], "method": experiment["runs"][first]["method"]}
    cfg = resolve_run(dict(experiment, runs={WARMSTART_RUN: spec}), WARMSTART_RUN, seed, config_dir)
    cfg["model"] = local[first]["model"]
    cfg["loss"] = asdict(LossConfig(method=None, loss_agg_mode=None))
    # it reads the TIR template only (its demonstrations), not the verl agent loop or tool config of its runs
    cfg["files"] = config.template_file(cfg["rollout"]["template"], config_dir)
    return cfg


def checksum_manifest(files: list[str]) -> dict:
    """{path: {sha256, bytes}} for each file; a missing file is an error naming it."""
    out = {}
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"{f}: expected a data file, not found")
        out[str(f)] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return {"files": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.configure", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", help="a JSON document (a resolved run config or the experiment config)")
    src.add_argument("--checksums", nargs="+", metavar="FILE", help="write a sha256 manifest of these files")
    ap.add_argument("--out", required=True, help="output .json path (written atomically)")
    args = ap.parse_args(argv)
    try:
        if args.json is not None:
            try:
                obj = json.loads(args.json)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--json: expected a JSON document ({e})") from None
            if not isinstance(obj, dict):
                raise ConfigError("--json: expected a JSON object at the top level")
        else:
            obj = checksum_manifest(args.checksums)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.out, obj)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
