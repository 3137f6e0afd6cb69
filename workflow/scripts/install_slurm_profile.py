"""Install the `slurm` global Snakemake profile (profiles/slurm/config.yaml).

    python workflow/scripts/install_slurm_profile.py --account ACCT --partition GPU_PART --cpu-partition CPU_PART

writes $XDG_CONFIG_HOME/snakemake/<name>/config.yaml (default ~/.config/snakemake/slurm/config.yaml) with
@ACCOUNT@, @PARTITION@ (training and evaluation) and @CPU_PARTITION@ (every other job) filled in, so
`snakemake --profile slurm`, run from any checkout of this repository, reproduces the paper. The profile
names no checkout: its `configfile` is relative to the directory Snakemake runs in.

An existing, different profile is never overwritten: the script refuses (exit 3) unless `--force`, which
first moves the old file to `config.yaml.bak-<UTC time>` and says so. `--name` installs under another
profile name (e.g. `ctpo-slurm`) beside a `slurm` profile you keep.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "profiles" / "slurm" / "config.yaml"
SAFE = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # SLURM account / partition names
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a profile directory name


def profile_dir(name: str = "slurm") -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake" / name


def render(template: str, account: str, partition: str, cpu_partition: str) -> str:
    for flag, value in (("--account", account), ("--partition", partition), ("--cpu-partition", cpu_partition)):
        if not SAFE.match(value):
            raise ValueError(f"{flag}: expected a SLURM name of letters, digits and _.,:+-, got {value!r}")
    text = (template.replace("@ACCOUNT@", account).replace("@CPU_PARTITION@", cpu_partition)
            .replace("@PARTITION@", partition))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"{TEMPLATE}: unfilled placeholder {left[0]}")
    return text


def install(text: str, out: Path, force: bool) -> str:
    """Write `text` to `out` atomically; returns a message. Raises FileExistsError for a different profile
    unless `force`, which keeps the old one as `<out>.bak-<UTC time>`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    if out.exists():
        if out.read_text() == text:
            return f"{out} is already installed with these settings; nothing changed"
        if not force:
            raise FileExistsError(
                f"{out} exists and differs; not overwriting it. Rerun with FORCE=1 (--force) to keep it as a "
                f"backup and install, or NAME=<other profile name> (--name) to install beside it"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup, n = out.with_name(f"{out.name}.bak-{stamp}"), 1
        while backup.exists():
            backup, n = out.with_name(f"{out.name}.bak-{stamp}.{n}"), n + 1
        os.replace(out, backup)
        note = f"previous profile kept as {backup}\n"
    fd, tmp = tempfile.mkstemp(prefix=".config.yaml.", dir=out.parent)  # atomic: temp file + rename
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return f"{note}installed {out}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--account", required=True, help="SLURM account (sbatch -A)")
    ap.add_argument("--partition", required=True, help="SLURM GPU partition for training and evaluation (sbatch -p)")
    ap.add_argument("--cpu-partition", required=True,
                    help="SLURM partition for CPU jobs: data, merges, diagnostics, tables (may equal --partition)")
    ap.add_argument("--name", default="slurm", help="profile name (directory under snakemake's config dir)")
    ap.add_argument("--force", action="store_true", help="replace a different existing profile, keeping a backup")
    args = ap.parse_args(argv)
    try:
        if not NAME.match(args.name):
            raise ValueError(f"--name: expected letters, digits and _.-, got {args.name!r}")
        text = render(TEMPLATE.read_text(), args.account, args.partition, args.cpu_partition)
        msg = install(text, profile_dir(args.name) / "config.yaml", args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(msg)
    print(f"run the paper from a checkout with: snakemake --profile {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
