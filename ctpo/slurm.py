"""The SLURM cluster's limits, read from `sinfo`, and whether a job's request fits them (stdlib only).

    SINFO_CMD = sinfo -h -o "%P %l %m %G %c"   (partition, time limit, memory per node in MB, GRES, CPUs per node)

`make slurm-profile` (workflow/scripts/install_slurm_profile.py, run by the system python) takes its defaults for
GPU type, CPUs per GPU, memory per CPU and wall time from `profile_defaults`; the workflow checks every rule
family's request with `check_request` before anything is submitted (workflow/rules/common.smk). A request
fits a partition when it is within the partition's time limit and one node group of the partition (one
`sinfo` line) has the CPUs, memory and GPUs of the type it asks for on each of its nodes.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field

SINFO_CMD = ["sinfo", "-h", "-o", "%P %l %m %G %c"]


@dataclass(frozen=True)
class NodeGroup:
    """One `sinfo` line: nodes of one partition with the same memory, GRES and CPU count."""
    mem_mb: int
    cpus: int
    gpus: dict = field(default_factory=dict)  # {GRES type ("" when untyped): GPUs per node}

    def gpu_count(self, gpu_type: str | None) -> int:
        return sum(n for t, n in self.gpus.items() if not gpu_type or t == gpu_type)


@dataclass(frozen=True)
class Partition:
    name: str
    time_min: int | None  # None: no limit
    groups: tuple[NodeGroup, ...]


def parse_time(text: str) -> int | None:
    """SLURM time limit ("2-00:00:00", "1:30:00", "45:00", "30", "infinite") -> whole minutes (None: none)."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", "none"):
        return None
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts) or (days and not days.isdigit()):
        raise ValueError(f"not a SLURM time limit: {text!r}")
    h, m, s = [int(p) for p in (["0"] * (3 - len(parts)) + parts)] if len(parts) > 1 else (0, int(parts[0]), 0)
    return int(days or 0) * 1440 + h * 60 + m + s // 60


def parse_gres(text: str) -> dict:
    """GRES ("gpu:h100:8(S:0-1)", "gpu:8", "gpu:a100:4,nvme:1", "(null)") -> {type: GPUs per node}."""
    out: dict[str, int] = {}
    for item in re.sub(r"\([^)]*\)", "", text).split(","):
        bits = item.strip().split(":")
        if bits[0] != "gpu" or len(bits) < 2:
            continue
        gpu_type, count = (bits[1], bits[2]) if len(bits) >= 3 else ("", bits[1])
        if count.isdigit():
            out[gpu_type] = out.get(gpu_type, 0) + int(count)
    return out


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo -h -o "%P %l %m %G %c"` output -> {partition name: Partition} (the default's `*` dropped)."""
    rows: dict[str, list] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) != 5:
            continue
        name = f[0].rstrip("*")
        mem, cpus = int(re.sub(r"\D.*", "", f[2]) or 0), int(re.sub(r"\D.*", "", f[4]) or 0)
        time_min, groups = rows.get(name, (parse_time(f[1]), []))
        groups.append(NodeGroup(mem, cpus, parse_gres(f[3])))
        rows[name] = (time_min, groups)
    return {n: Partition(n, t, tuple(g)) for n, (t, g) in rows.items()}


def query_sinfo() -> dict[str, Partition] | None:
    """The cluster's partitions, or None where `sinfo` is missing or does not answer."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(SINFO_CMD, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sinfo(out) or None


def request(res: dict) -> dict:
    """What a job with Snakemake resources `res` asks each node for (as the SLURM executor plugin builds
    sbatch: --gpus=<model>:<gpu> or --gres, --cpus-per-gpu / --cpus-per-task, --mem-per-cpu over --mem; with
    nodes > 1, `gpu` GPUs per node, as snakemake_executor_plugin_ctpo_slurm submits it)."""
    nodes = int(res.get("nodes") or 1)
    gpu, gpu_type = int(res.get("gpu") or 0), res.get("gpu_model") or None
    if res.get("gres"):
        g = parse_gres(str(res["gres"]))
        if g:
            (gpu_type, gpu), = g.items()
            gpu_type = gpu_type or None
    cpus = int(res.get("cpus_per_gpu") or 1) * gpu if gpu and res.get("cpus_per_gpu") else int(
        res.get("cpus_per_task") or 1)
    # more than one node: `gpu` is per node (the ctpo-slurm executor's --gres=gpu:<model>:<gpu>), so are its CPUs
    spread = 1 if gpu and not res.get("gres") else nodes
    per_node = lambda n: math.ceil(n / spread)  # noqa: E731
    mem = int(res["mem_mb_per_cpu"]) * cpus if res.get("mem_mb_per_cpu") else int(res.get("mem_mb") or 0)
    return {"partition": res.get("slurm_partition"), "time_min": int(res.get("runtime") or 0), "nodes": nodes,
            "gpus": per_node(gpu), "gpu_type": gpu_type, "cpus": per_node(cpus), "mem_mb": per_node(mem)}


def check_request(label: str, res: dict, partitions: dict[str, Partition]) -> str | None:
    """None when `res` can run on its partition, else one line saying which limit it exceeds."""
    r = request(res)
    where = f"{label}: partition {r['partition']!r}"
    if r["partition"] not in partitions:
        return f"{where} is not one of the cluster's partitions ({', '.join(sorted(partitions))}; sinfo)"
    p = partitions[r["partition"]]
    if p.time_min is not None and r["time_min"] > p.time_min:
        return f"{where}: runtime {r['time_min']} min exceeds its time limit of {p.time_min} min (sinfo %l)"
    gpu = f"{r['gpus']} x {r['gpu_type'] or 'any'} GPU"
    asks = f"{gpu}, {r['cpus']} CPUs, {r['mem_mb']} MB per node"
    fits = [g for g in p.groups if g.gpu_count(r["gpu_type"]) >= r["gpus"] and g.cpus >= r["cpus"]
            and g.mem_mb >= r["mem_mb"]]
    if fits:
        return None
    has = "; ".join(f"{_gpus(g)} GPU, {g.cpus} CPUs, {g.mem_mb} MB" for g in p.groups)
    return f"{where}: no node fits {asks} (its nodes: {has}; sinfo %G %c %m)"


def _gpus(g: NodeGroup) -> str:
    return ", ".join(f"{n} x {t or 'untyped'}" for t, n in g.gpus.items()) or "no"


def profile_defaults(p: Partition) -> dict:
    """GPU type, CPUs per GPU, memory per CPU and wall time of a GPU partition's largest GPU nodes (a
    whole node's CPUs and memory shared evenly among its GPUs). Keys absent where sinfo does not say."""
    gpu_groups = [g for g in p.groups if g.gpus]
    out: dict = {}
    if p.time_min is not None:
        out["runtime"] = p.time_min
    if not gpu_groups:
        return out
    g = max(gpu_groups, key=lambda g: (g.gpu_count(None), g.mem_mb))
    n = g.gpu_count(None)
    if len(g.gpus) == 1 and next(iter(g.gpus)):
        out["gpu_model"] = next(iter(g.gpus))
    if g.cpus:
        out["cpus_per_gpu"] = max(1, g.cpus // n)
        out["mem_mb_per_cpu"] = max(1, g.mem_mb // g.cpus)
    return out
