"""A fake SLURM cluster and a recording `conda` for tests that run the real SLURM executor and job-step plugins.

`make_cluster(root, ...)` writes stand-ins for `sbatch`, `sacct`, `squeue`, `srun`, `sacctmgr`, `sshare`, `sinfo`,
`scontrol`, `scancel` into root/bin, and a conda installation (root/conda: `conda` and `activate`) whose
`conda env create --file F --prefix P` records the call and builds P as a venv: the project's packages (a .pth
to this venv's site-packages) plus, in every env, a start-up hook that appends one JSON line per interpreter
start (env name, sys.prefix, argv) to P/starts.jsonl; the env named `ctpo-gpu` also holds the stand-in GPU
marker package `ctpo_gpu_marker`. `pip` inside an env only records its arguments (the post-deploy step).

`sbatch` records its argv (NUL-separated, root/log/sbatch.<id>.call) and runs the job's `--wrap` in the
background on a fresh "node": a user and mount namespace in which the other rule family's conda envs are
hidden (an empty directory bind-mounted over them: GPU partition -> only the GPU env exists, any other
partition -> only the CPU env), under `env -i` with HOME, PATH=root/bin:/usr/bin:/bin and SLURM_JOB_ID only
(nothing of the submitting shell: no VIRTUAL_ENV, no venv on PATH). Its stdout and stderr go to sbatch's
--output file; its exit status to root/log/job.<id>.rc. `sacct` reports RUNNING until then, COMPLETED or
FAILED after; FAKE_SLURM_STATES (a file of `<--comment> <STATE>` lines, e.g. `rule_table1 TIMEOUT`) sets the state
the first job of that comment ends in (what SLURM reports for a job it killed at its time limit).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SITE = next(p for p in sys.path if p.endswith("site-packages"))

SBATCH = r'''
import json, os, subprocess, sys
from pathlib import Path
root = Path(os.environ["FAKE_SLURM_ROOT"])
log = root / "log"
argv = sys.argv[1:]
sys.stdin.read() if not sys.stdin.isatty() else None
jid = str(os.getpid())
tmp = log / f"sbatch.{jid}.tmp"
tmp.write_text("\0".join(argv) + "\0")
tmp.rename(log / f"sbatch.{jid}.call")
opt = lambda flag: argv[argv.index(flag) + 1] if flag in argv else None
wrap = next(a[len("--wrap="):] for a in argv if a.startswith("--wrap="))
out = (opt("--output") or str(root / "slurm-%j.out")).replace("%j", jid)
workdir = opt("-D") or os.getcwd()
family = "ctpo-gpu" if opt("-p") == os.environ.get("FAKE_GPU_PARTITION") else "ctpo-cpu"
hide = []
prefix = os.environ.get("FAKE_CONDA_ENVS")
if prefix and Path(prefix).is_dir():
    for name_file in Path(prefix).glob("*/ctpo_env_name"):
        if name_file.read_text().strip() != family:
            hide.append(str(name_file.parent))
empty = root / "empty"
mounts = "".join(f"mount --bind {empty} {h} && " for h in hide)
node_env = ["env", "-i", f"HOME={root / 'home'}", f"PATH={root / 'bin'}:/usr/bin:/bin", f"SLURM_JOB_ID={jid}",
            f"SLURM_JOB_PARTITION={opt('-p') or ''}", "SLURM_GPUS=8" if family == "ctpo-gpu" else "SLURM_NNODES=1"]
inner = " ".join(__import__("shlex").quote(a) for a in node_env + ["sh", "-c", wrap])
job = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"{mounts}exec {inner}"]
(log / f"job.{jid}.node").write_text(json.dumps({"family": family, "hidden": hide}))
runner = (f"import subprocess,sys\nwith open({out!r},'ab') as f:\n"
          f" rc=subprocess.call({job!r},cwd={workdir!r},stdout=f,stderr=subprocess.STDOUT,stdin=subprocess.DEVNULL)\n"
          f"open({str(log / ('job.' + jid + '.rc'))!r},'w').write(str(rc))\n")
subprocess.Popen([sys.executable, "-c", runner], start_new_session=True, stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(jid)
'''

SACCT = r'''
import os, sys
from pathlib import Path
root = Path(os.environ["FAKE_SLURM_ROOT"])
log = root / "log"
if "-j" in sys.argv:  # the plugin's per-step reason query of a failed job
    sys.exit(0)
states = {}  # --comment of a rule's job -> the state its FIRST job ends in (e.g. rule_table1 TIMEOUT)
f = os.environ.get("FAKE_SLURM_STATES")
if f and Path(f).exists():
    states = dict(line.split() for line in Path(f).read_text().splitlines() if line.strip())
seen = set()
for call in sorted(log.glob("sbatch.*.call"), key=lambda p: p.stat().st_mtime):
    jid = call.name.split(".")[1]
    argv = call.read_text().split("\0")
    comment = argv[argv.index("--comment") + 1] if "--comment" in argv else ""
    first = comment not in seen
    seen.add(comment)
    rc = log / f"job.{jid}.rc"
    if not rc.exists():
        state = "RUNNING"
    elif first and comment in states:
        state = states[comment]
    else:
        state = "COMPLETED" if rc.read_text() == "0" else "FAILED"
    print(f"{jid}|{state}")
'''

# srun -n1 --cpu-bind=q --cpus-per-task=4 --nodes=1 CMD...: drop the options, run CMD (in the job's shell)
SRUN = 'while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done; exec sh -c "$*"'

FIXED = {
    "sacctmgr": 'echo "  $FAKE_ACCOUNT"',
    "sshare": 'echo "$FAKE_ACCOUNT"',
    "sinfo": 'printf "%s" "$FAKE_SINFO"',
    "scontrol": 'echo "MaxArraySize = 1001"',
    "scancel": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_ROOT/log/scancel.args"',
    "squeue": 'exit 0',
}

CONDA = r'''#!/bin/sh
# recording conda stand-in: what Snakemake's conda deployment would create and activate
printf "%s\n" "$*" >> "@LOG@/conda.calls"
case "$1" in
  --version) echo "conda 24.11.3";;
  info) echo '{"conda_prefix": "@BASE@", "platform": "linux-64", "conda_version": "24.11.3"}';;
  config) echo '{"get": {"channel_priority": "strict"}}';;
  clean) ;;
  env)
    file=""; prefix=""
    for a in "$@"; do case "$a" in --file=*) file="${a#--file=}";; --prefix=*) prefix="${a#--prefix=}";; esac; done
    while [ $# -gt 0 ]; do case "$1" in --file) file="$2"; shift;; --prefix) prefix="$2"; shift;; esac; shift; done
    exec "@PY@" "@BASE@/make_env.py" "$file" "$prefix";;
  *) echo "fake conda: unsupported: $*" >&2; exit 1;;
esac
'''

MAKE_ENV = r'''
import json, re, subprocess, sys
from pathlib import Path
env_file, prefix = Path(sys.argv[1]), Path(sys.argv[2])
name = re.search(r"^name:\s*(\S+)", env_file.read_text(), re.M).group(1)
subprocess.run(["@BASEPY@", "-m", "venv", "--without-pip", str(prefix)], check=True)
site = next(prefix.glob("lib/python3*/site-packages"))
(site / "_ctpo_project.pth").write_text("import site; site.addsitedir(@SITE@)\n")
(site / "ctpo_env_record.py").write_text(
    "import json, os, sys\n"
    f"NAME = {name!r}\n"
    "def record():\n"
    "    line = json.dumps({'env': NAME, 'prefix': sys.prefix, 'argv': sys.orig_argv, 'cwd': os.getcwd(),\n"
    "                       'virtual_env': os.environ.get('VIRTUAL_ENV')})\n"
    f"    with open({str(prefix / 'starts.jsonl')!r}, 'a') as f:\n"
    "        f.write(line + '\\n')\n"
    "record()\n")
(site / "zz_ctpo_env_record.pth").write_text("import ctpo_env_record\n")
if name == "ctpo-gpu":
    (site / "ctpo_gpu_marker").mkdir()
    (site / "ctpo_gpu_marker" / "__init__.py").write_text("STACK = 'stand-in for the GPU set'\n")
pip = prefix / "bin" / "pip"
pip.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {str(prefix / 'pip.calls')!r}\n")
pip.chmod(0o755)
(prefix / "ctpo_env_name").write_text(name + "\n")
print(json.dumps({"created": str(prefix), "name": name}))
'''

ACTIVATE = 'export CONDA_PREFIX="$1"; export PATH="$1/bin:$PATH"\n'


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def make_conda(conda: Path, log: Path) -> Path:
    """The recording conda installation at `conda` (calls logged to log/conda.calls); returns `conda`."""
    for d in (conda / "bin", conda / "etc/profile.d", log):
        d.mkdir(parents=True, exist_ok=True)
    base_py = getattr(sys, "_base_executable", sys.executable)
    _script(conda / "bin" / "conda", CONDA.replace("@LOG@", str(log)).replace("@BASE@", str(conda))
            .replace("@PY@", sys.executable))
    (conda / "bin" / "activate").write_text(ACTIVATE)
    (conda / "etc/profile.d/conda.sh").write_text(f'export PATH="{conda / "bin"}:$PATH"\n')  # conda's shell set-up
    (conda / "make_env.py").write_text(MAKE_ENV.replace("@BASEPY@", base_py).replace("@SITE@", repr(SITE)))
    return conda


def make_cluster(root: Path) -> dict:
    """Write the stand-ins under `root`; returns the environment variables the submitting side needs (merge
    into os.environ and prepend root/bin to PATH)."""
    bin_dir, log, conda = root / "bin", root / "log", root / "conda"
    for d in (bin_dir, log, root / "empty", root / "home"):
        d.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", SBATCH), ("sacct", SACCT)):
        _script(bin_dir / name, f"#!{sys.executable}\n{body}")
    _script(bin_dir / "srun", f"#!/bin/sh\n{SRUN}\n")
    for name, body in FIXED.items():
        _script(bin_dir / name, f"#!/bin/sh\n{body}\n")
    make_conda(conda, log)
    return {"FAKE_SLURM_ROOT": str(root), "PATH_PREPEND": f"{bin_dir}:{conda / 'bin'}"}


def sbatch_calls(root: Path) -> dict[str, list[str]]:
    """{job id: sbatch argv} in submission order."""
    calls = sorted((root / "log").glob("sbatch.*.call"), key=lambda p: p.stat().st_mtime)
    return {p.name.split(".")[1]: p.read_text().split("\0")[:-1] for p in calls}


def starts(env_prefix: Path) -> list[dict]:
    f = env_prefix / "starts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
