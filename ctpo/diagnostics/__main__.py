"""python -m ctpo.diagnostics --dump runs/{exp}/{run}/seed{s}/rollouts/step{N}.npz --config <run config .json>
    --bands results/{exp}/configs/figure1_bands.json --bin-width W --min-bin-tokens N
    --out results/{exp}/diagnostics/{run}/seed{s}/step{N}.parquet

--bands: Figure 1's two clip bands as the workflow planned them (ctpo.diagnostics.bands: the experiment's
`diagnostics.bands`, else its ablation pair `evaluation.table3_runs`).

Writes the per-bin parquet (ctpo.schema.DIAG_COLUMNS) and a .json beside it (same stem) with sigma_hat,
r2, n_sequences, n_tokens, step, the bands used and the experiment label.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ctpo.config import ConfigError, load_run_config
from ctpo.diagnostics.bands import read_bands
from ctpo.diagnostics.run import diagnose
from ctpo.io import write_json, write_parquet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.diagnostics", description=__doc__.splitlines()[0])
    ap.add_argument("--dump", required=True, help="rollout dump step<N>.npz")
    ap.add_argument("--config", required=True, help="the run's resolved config (.json)")
    ap.add_argument("--bands", required=True, help="Figure 1's bands (.json, ctpo.diagnostics.bands)")
    ap.add_argument("--bin-width", type=int, required=True, help="positions per bin")
    ap.add_argument("--min-bin-tokens", type=int, required=True,
                    help="bins with fewer tokens are kept in the parquet but left out of the fit and Figure 1")
    ap.add_argument("--out", required=True, help="output .parquet (a .json summary is written beside it)")
    ap.add_argument("--chunk-rows", type=int, default=256, help="rows read at a time (memory bound)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".parquet":
        print(f"error: --out {out}: expected a .parquet path", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args.config)
        bands = read_bands(args.bands)
        cols, summary = diagnose(args.dump, bands, args.bin_width, args.min_bin_tokens, args.chunk_rows)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary.update(experiment=cfg.experiment, run=cfg.run, seed=cfg.seed, label=cfg.label, method=cfg.loss.method)
    write_parquet(out, pd.DataFrame(cols))
    write_json(out.with_suffix(".json"), summary)  # ctpo.layout's 'diag_json' for its 'diag' (tests/test_layout.py)
    print(
        f"diagnostics {cfg.run} seed{cfg.seed} step{summary['step']}: sigma_hat={summary['sigma_hat']:.4g} "
        f"R^2={summary['r2']:.3f} over {summary['n_bins_kept']}/{summary['n_bins']} bins with >= "
        f"{summary['min_bin_tokens']} tokens; {summary['n_sequences']} sequences / {summary['n_tokens']} tokens -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
