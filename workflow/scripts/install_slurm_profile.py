"""Install the `slurm` global Snakemake profile (profiles/slurm/config.yaml).

    python workflow/scripts/install_slurm_profile.py --account ACCT --partition GPU_PART --cpu-partition CPU_PART

writes $XDG_CONFIG_HOME/snakemake/<name>/config.yaml (default ~/.config/snakemake/slurm/config.yaml) with
@ACCOUNT@, @PARTITION@ (training and evaluation) and @CPU_PARTITION@ (every other job) filled in, so
`snakemake --profile slurm`, run from any checkout of this repository, reproduces the paper. The profile
names no checkout: its `configfile` is relative to the directory Snakemake runs in.

The GPU partition's limits: --gpu-type (GRES type), --cpus-per-gpu, --mem-per-cpu (MB) and --time (minutes,
training; evaluation gets min(--time, 480)) default to what `sinfo -h -o "%P %l %m %G %c"` says about the GPU
partition's largest GPU nodes (ctpo.slurm.profile_defaults); a value sinfo does not give must be passed.
The jobs find conda through its shell set-up, `. <conda base>/etc/profile.d/conda.sh` (Snakemake's `precommand`,
run first in every job: a compute node inherits no PATH); the base is --conda-base, else the conda of this
shell ($CONDA_EXE, or `conda` on PATH). --conda-prefix puts the rule families' conda envs in a shared directory
(Snakemake's `conda-prefix`) instead of each checkout's .snakemake/conda.

An existing, different profile is never overwritten: the script refuses (exit 3) unless `--force`, which
first moves the old file to `config.yaml.bak-<UTC time>` and says so. `--name` installs under another
profile name (e.g. `ctpo`) beside a `slurm` profile you keep.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # ctpo.slurm (stdlib only) from this checkout
from ctpo.slurm import query_sinfo, profile_defaults  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[2] / "profiles" / "slurm" / "config.yaml"
SAFE = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # SLURM account / partition names
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a profile directory name
GPU_TYPE = re.compile(r"^[A-Za-z0-9_.]*$")  # a GRES type name ("" = any GPU), as the executor plugin accepts
EVAL_MAX_MIN = 480  # an evaluation (one checkpoint, one benchmark, k=32) asks for at most 8 h
# profile key <- (flag, ctpo.slurm.profile_defaults key, placeholder)
LIMITS = {"gpu_type": ("--gpu-type", "gpu_model", "@GPU_MODEL@"),
          "cpus_per_gpu": ("--cpus-per-gpu", "cpus_per_gpu", "@CPUS_PER_GPU@"),
          "mem_per_cpu": ("--mem-per-cpu", "mem_mb_per_cpu", "@MEM_PER_CPU@"),
          "time": ("--time", "runtime", "@TIME@")}


def profile_dir(name: str = "slurm") -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "snakemake" / name


def gpu_limits(partition: str, given: dict, partitions: dict | None) -> dict:
    """{gpu_type, cpus_per_gpu, mem_per_cpu, time}: each given value, else sinfo's default for `partition`.
    Raises ValueError naming the flag of a value neither gives."""
    found = profile_defaults(partitions[partition]) if partitions and partition in partitions else {}
    out = {}
    for key, (flag, sinfo_key, _) in LIMITS.items():
        value = given.get(key)
        out[key] = found.get(sinfo_key) if value is None else value
        if out[key] is None:
            why = ("sinfo is not available here" if partitions is None else
                   f"sinfo lists no partition {partition!r}" if partition not in partitions else
                   f"sinfo does not say for partition {partition!r}")
            make_var = flag[2:].upper().replace("-", "_")
            raise ValueError(f"{flag}: {why}; pass it (make slurm-profile ... {make_var}=...)")
    if not GPU_TYPE.match(str(out["gpu_type"])):
        raise ValueError(f"--gpu-type: expected a GRES type name (letters, digits, _ .) or '', got {out['gpu_type']!r}")
    for key in ("cpus_per_gpu", "mem_per_cpu", "time"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{LIMITS[key][0]}: expected a positive integer, got {out[key]!r}")
    return out


def conda_base(given: str | None) -> Path:
    """The conda installation jobs use: `given`, else the one of this shell. Raises ValueError if none."""
    if given is None:
        exe = os.environ.get("CONDA_EXE") or shutil.which("conda")
        if not exe:
            raise ValueError("--conda-base: no conda in this shell (no $CONDA_EXE, no `conda` on PATH); load or "
                             "activate conda first (e.g. module load miniforge) or pass CONDA_BASE=<dir>")
        given = str(Path(exe).resolve().parents[1])
    base = Path(given)
    if not (base / "etc/profile.d/conda.sh").is_file():
        raise ValueError(f"--conda-base: {base}/etc/profile.d/conda.sh not found; expected a conda installation")
    return base


def render(template: str, account: str, partition: str, cpu_partition: str, limits: dict,
           conda_prefix: str | None = None, base: Path | None = None) -> str:
    for flag, value in (("--account", account), ("--partition", partition), ("--cpu-partition", cpu_partition)):
        if not SAFE.match(value):
            raise ValueError(f"{flag}: expected a SLURM name of letters, digits and _.,:+-, got {value!r}")
    text = (template.replace("@ACCOUNT@", account).replace("@CPU_PARTITION@", cpu_partition)
            .replace("@PARTITION@", partition).replace("@EVAL_TIME@", str(min(limits["time"], EVAL_MAX_MIN))))
    for key, (_, _, placeholder) in LIMITS.items():
        text = text.replace(placeholder, str(limits[key]))
    if conda_prefix is not None:
        if not conda_prefix.startswith("/") or any(c in conda_prefix for c in "\n\"'#:"):
            raise ValueError(f"--conda-prefix: expected an absolute directory path, got {conda_prefix!r}")
        text = text.replace("software-deployment-method: conda\n",
                            f"software-deployment-method: conda\nconda-prefix: {conda_prefix}   # shared: built once\n")
    if base is not None:
        setup = shlex.quote(str(base / "etc/profile.d/conda.sh"))
        text = text.replace("software-deployment-method: conda\n", f"software-deployment-method: conda\nprecommand: "
                            f"\". {setup}\"   # every job: conda's shell set-up (conda on PATH), on the node\n")
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
    ap.add_argument("--gpu-type", default=None, help="GPU GRES type (sbatch --gpus=<type>:<n>; '' = any GPU)")
    ap.add_argument("--cpus-per-gpu", type=int, default=None, help="CPU cores per GPU of GPU jobs")
    ap.add_argument("--mem-per-cpu", type=int, default=None, help="memory per CPU core of GPU jobs, MB")
    ap.add_argument("--time", type=int, default=None, help="wall time of a training job, minutes")
    ap.add_argument("--conda-base", default=None, help="conda installation the jobs use (default: this shell's)")
    ap.add_argument("--conda-prefix", default=None, help="shared directory for the conda envs (absolute)")
    ap.add_argument("--name", default="slurm", help="profile name (directory under snakemake's config dir)")
    ap.add_argument("--force", action="store_true", help="replace a different existing profile, keeping a backup")
    args = ap.parse_args(argv)
    try:
        if not NAME.match(args.name):
            raise ValueError(f"--name: expected letters, digits and _.-, got {args.name!r}")
        given = {k: getattr(args, k) for k in LIMITS}
        partitions = None if all(v is not None for v in given.values()) else query_sinfo()
        limits = gpu_limits(args.partition, given, partitions)
        text = render(TEMPLATE.read_text(), args.account, args.partition, args.cpu_partition, limits, args.conda_prefix,
                      conda_base(args.conda_base))
        msg = install(text, profile_dir(args.name) / "config.yaml", args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(msg)
    print(f"GPU jobs ({args.partition}): {limits['gpu_type'] or 'any'} GPUs, {limits['cpus_per_gpu']} CPUs and "
          f"{limits['cpus_per_gpu'] * limits['mem_per_cpu']} MB per GPU, training {limits['time']} min")
    print(f"run the paper from a checkout with: snakemake --profile {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
