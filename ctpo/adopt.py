"""Adopt a copied `results/<exp>/` tree (e.g. the released paper results) into this checkout.

    python -m ctpo.adopt --configfile configs/experiments/paper.yaml      # from the checkout's root

Snakemake decides what to rerun from file dates and from its records in `.snakemake/metadata/` (each
output's params and code). A fresh checkout has no records and copied files carry arbitrary dates, so plain
`snakemake` would redo evaluations whose config file merely looks newer, and would never notice an edited
method file (no params were recorded). Adoption:

  1. compares every copied config file (`experiment.json`, `configs/<run>/seed<s>.json`,
     `configs/sft/seed<s>.json`, `configs/data.json`) with what this checkout resolves (the same functions
     the rules use: `ctpo.configure.resolve_runs`, `warmstart_config`, `canonical_json`);
  2. runs `snakemake --touch --forceall --cores 1 --configfile <experiment>`: every output of the DAG is
     touched in DAG order and recorded as produced by this checkout's rules and params;
  3. rewrites the copied config files that differ with this checkout's content (as `ctpo.configure`
     writes them), after the touch: newer than every output, so the next `snakemake` reruns exactly the
     jobs that depend on them. (Deleting them would not do: Snakemake does not rebuild a missing
     intermediate file whose consumers are up to date.)

Afterwards editing one method file reruns that method's runs only, as in a checkout that produced the
results itself. The library never imports Snakemake: it runs as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ctpo import layout
from ctpo.config import ConfigError, canonical_json, load_experiment
from ctpo.configure import resolve_runs, warmstart_config
from ctpo.io import write_json


def expected_configs(experiment: dict, config_dir: Path) -> dict[str, dict]:
    """{path relative to the checkout: the JSON the workflow's config rules write} for this checkout.
    Mirrors workflow/rules/data.smk (experiment_config, run_config, sft_config, data_config)."""
    exp = experiment["experiment"]
    out = {layout.path("experiment", exp=exp): experiment,
           layout.path("data_config", exp=exp): {k: experiment[k] for k in ("experiment", "label", "data")}}
    resolved = resolve_runs(experiment, config_dir)
    for (run, seed), cfg in resolved.items():
        out[layout.path("run_config", exp=exp, run=run, seed=seed)] = cfg
    if any(cfg["train"]["backend"] == "local" for cfg in resolved.values()):
        for seed in experiment["seeds"]:
            out[layout.path("sft_config", exp=exp, seed=int(seed))] = warmstart_config(experiment, int(seed), config_dir)
    return {str(p): json.loads(canonical_json(obj)) for p, obj in out.items()}


def first_difference(old, new, path: str = "") -> str:
    """The first key path where two JSON values differ, as `a.b: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k, "<absent>") != new.get(k, "<absent>"):
                return first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else k)
    return f"{path or '<top>'}: {json.dumps(old)} -> {json.dumps(new)}"


def stale_configs(root: Path, experiment: dict) -> dict[str, tuple[str, dict]]:
    """{copied config file: (first difference, this checkout's content)} for each copied config file this
    checkout would write differently."""
    stale = {}
    for rel, want in expected_configs(experiment, root / "configs").items():
        p = root / rel
        if not p.is_file():
            continue
        try:
            have = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            stale[rel] = (f"not JSON ({e.msg})", want)
            continue
        if have != want:
            stale[rel] = (first_difference(have, want), want)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.adopt", description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", required=True, help="the experiment file the results were made with")
    ap.add_argument("--root", default=".", help="the checkout (default: the current directory)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        experiment = load_experiment(root / args.configfile)
        results = root / "results" / experiment["experiment"]
        if not results.is_dir():
            raise ConfigError(f"{results}: no results tree to adopt; copy results/{experiment['experiment']}/ first")
        stale = stale_configs(root, experiment)
    except (ConfigError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "snakemake", "--touch", "--forceall", "--cores", "1", "--quiet", "rules",
           "--configfile", args.configfile]
    print("[ctpo] " + " ".join(cmd[2:]), flush=True)
    rc = subprocess.run(cmd, cwd=root).returncode
    if rc != 0:
        print(f"error: snakemake --touch failed (exit {rc})", file=sys.stderr)
        return rc
    for rel, (why, want) in sorted(stale.items()):
        write_json(root / rel, want)
        print(f"[ctpo] {rel} differs from this checkout ({why}): rewritten; `snakemake` reruns what depends on it")
    print(f"[ctpo] adopted {results.relative_to(root)}/ ({len(stale)} config file(s) differ from this checkout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
