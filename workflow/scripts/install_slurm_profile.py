"""Install the `slurm` global Snakemake profile (profiles/slurm/config.yaml) for this repository.

    python workflow/scripts/install_slurm_profile.py --account ACCT --partition PART --repo /path/to/ctpo-repro

writes $XDG_CONFIG_HOME/snakemake/slurm/config.yaml (default ~/.config/snakemake/slurm/config.yaml) with
@ACCOUNT@, @PARTITION@ and @REPO@ filled in, so `snakemake --profile slurm` reproduces the paper.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "profiles" / "slurm" / "config.yaml"
SAFE = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # SLURM account / partition names


def profile_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake" / "slurm"


def render(template: str, account: str, partition: str, repo: Path) -> str:
    for name, value in (("--account", account), ("--partition", partition)):
        if not SAFE.match(value):
            raise ValueError(f"{name}: expected a SLURM name of letters, digits and _.,:+-, got {value!r}")
    if not (repo / "Snakefile").is_file():
        raise ValueError(f"--repo: {repo} has no Snakefile; expected the ctpo-repro checkout")
    text = template.replace("@ACCOUNT@", account).replace("@PARTITION@", partition).replace("@REPO@", str(repo))
    if re.search(r"@[A-Z]+@", text):
        raise ValueError(f"{TEMPLATE}: unfilled placeholder left")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--account", required=True, help="SLURM account (sbatch -A)")
    ap.add_argument("--partition", required=True, help="SLURM GPU partition (sbatch -p)")
    ap.add_argument("--repo", required=True, help="absolute path of this repository")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        text = render(TEMPLATE.read_text(), args.account, args.partition, repo)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = profile_dir() / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.yaml.", dir=out.parent)  # atomic: temp file + rename
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"installed {out}\nrun the paper with: cd {repo} && snakemake --profile slurm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
