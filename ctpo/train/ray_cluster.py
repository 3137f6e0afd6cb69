"""A Ray cluster across the nodes of one SLURM job, for `train.n_nodes > 1` (verl joins it through RAY_ADDRESS).

The batch script runs on the job's first node; the launcher there
  1. reads the job's nodes (`scontrol show hostnames $SLURM_JOB_NODELIST`; the first must be this host);
  2. starts the head on this node: `ray start --head --node-ip-address=<this node's IP> --port=<free port>
     --num-gpus=<n_gpus> [--num-cpus=<n>] --temp-dir=<run's Ray dir> --include-dashboard=false --block`;
  3. starts one worker per other node in one job step: `srun --nodes=N-1 --ntasks=N-1 --ntasks-per-node=1
     --exclude=<head> --kill-on-bad-exit=1 ray start --address=<head>:<port> --num-gpus=<n_gpus> ... --block`;
  4. waits (bounded, `JOIN_TIMEOUT_S`) until Ray lists N alive nodes, then runs verl with RAY_ADDRESS set;
  5. afterwards stops the worker step and the head (SIGTERM to their process groups, then SIGKILL).
The node and GPU counts are given to `ray start` (verl's `ray_kwargs.ray_init` must not name them when it
connects to an existing cluster: ray.init refuses num_cpus / num_gpus / _temp_dir there).
One node (`n_nodes == 1`) uses none of this: verl starts its own private Ray as before.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

JOIN_TIMEOUT_S = 600  # a worker node's Ray start (imports, raylet) can be slow on a busy shared file system
STOP_GRACE_S = 30
# ray_init keys verl must not pass when it connects to the cluster started here
CLUSTER_KEYS = ("ray_kwargs.ray_init._temp_dir", "ray_kwargs.ray_init.include_dashboard",
                "ray_kwargs.ray_init.num_cpus", "ray_kwargs.ray_init.num_gpus")

_COUNT = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        print(len(alive), flush=True)
        break
    time.sleep(1.0)
"""


# Ray 2.60 turns on token authentication for a cluster started with `ray start --head` (the token in
# ~/.ray/auth_token, shared by the nodes through the home directory); a driver given an explicit address does not
# turn it on by itself, so the head, the workers and verl's driver all run with it set
AUTH_ENV = {"RAY_AUTH_MODE": "token"}


def driver_env(address: str) -> dict[str, str]:
    """What verl's driver needs to join the cluster at `address`."""
    return {"RAY_ADDRESS": address, **AUTH_ENV}


class ClusterError(RuntimeError):
    """The Ray cluster could not be formed; the message is one line."""


def drop_cluster_keys(argv: list[str]) -> list[str]:
    """verl's overrides without the ray_init keys a connecting driver may not pass."""
    return [a for a in argv if a.split("=", 1)[0].lstrip("+") not in CLUSTER_KEYS]


def job_nodes(env=os.environ) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ClusterError("train.n_nodes > 1 needs a SLURM job across that many nodes (no SLURM_JOB_NODELIST: "
                           "not inside sbatch?)")
    try:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClusterError(f"scontrol show hostnames {nodelist}: {e}") from None
    if proc.returncode != 0:
        raise ClusterError(f"scontrol show hostnames {nodelist} failed: {proc.stderr.strip()[:200]}")
    return proc.stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def head_ip() -> str:
    """This node's address the other nodes reach: the first non-loopback address of `hostname -I` (a hostname
    often resolves to 127.0.1.1 through /etc/hosts), else what the hostname resolves to."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    v4 = [a for a in out if "." in a and not a.startswith("127.")]
    return v4[0] if v4 else socket.gethostbyname(socket.gethostname())


def ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def for_run(cfg, temp_dir: str | Path, env: dict, log=print):
    """The run's cluster: a RayCluster for `train.n_nodes > 1`, else a context that yields None (verl starts its
    own Ray). The `cpu` device profile gives each node its logical CPUs and devices (ctpo.train.verl_cpu)."""
    from contextlib import nullcontext

    t = cfg.train
    if t.n_nodes <= 1:
        return nullcontext(None)
    cpus = None
    if t.verl_device == "cpu":
        from ctpo.train.verl_cpu import RAY_LOGICAL_CPUS

        cpus = RAY_LOGICAL_CPUS
    return RayCluster(t.n_nodes, t.n_gpus, temp_dir, env, cpus_per_node=cpus, log=log)


class RayCluster:
    """Context manager: head here + workers through srun; yields the address for RAY_ADDRESS."""

    def __init__(self, n_nodes: int, gpus_per_node: int, temp_dir: str | Path, env: dict,
                 cpus_per_node: int | None = None, log=print):
        self.n, self.gpus, self.cpus = n_nodes, gpus_per_node, cpus_per_node
        # Ray's socket paths (<temp_dir>/session_*/sockets/...) must stay under 108 characters: callers pass
        # ctpo.train.verl_command.ray_temp_dir(workdir)
        self.temp_dir, self.env, self.log = Path(temp_dir), {**env, **AUTH_ENV}, log
        self.procs: list[subprocess.Popen] = []
        self.address = None

    def _resources(self) -> list[str]:
        return [f"--num-gpus={self.gpus}"] + ([f"--num-cpus={self.cpus}"] if self.cpus is not None else [])

    def commands(self, nodes: list[str], ip: str, port: int) -> tuple[list[str], list[str]]:
        ray = ray_bin()
        head = [ray, "start", "--head", f"--node-ip-address={ip}", f"--port={port}", *self._resources(),
                f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats", "--block"]
        workers = ["srun", f"--nodes={self.n - 1}", f"--ntasks={self.n - 1}", "--ntasks-per-node=1",
                   f"--exclude={nodes[0]}", "--kill-on-bad-exit=1", ray, "start", f"--address={ip}:{port}",
                   *self._resources(), "--disable-usage-stats", "--block"]
        return head, workers

    def __enter__(self) -> str:
        nodes = job_nodes(self.env)
        here = socket.gethostname().split(".")[0]
        if len(nodes) < self.n:
            raise ClusterError(f"train.n_nodes {self.n}: the SLURM job has {len(nodes)} node(s) ({' '.join(nodes)})")
        if nodes[0].split(".")[0] != here:
            raise ClusterError(f"the launcher runs on {here}, not on the job's first node {nodes[0]}")
        nodes = nodes[: self.n]
        ip = head_ip()
        port = free_port()
        self.address = f"{ip}:{port}"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        head, workers = self.commands(nodes, ip, port)
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        self.log(f"[ctpo] Ray head on {here} ({self.address}), workers on {' '.join(nodes[1:])} via srun")
        try:
            self.procs.append(subprocess.Popen(head, env=env, start_new_session=True))
            self._wait_head()
            self.procs.append(subprocess.Popen(workers, env=env, start_new_session=True))
            self._wait()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.address

    def _wait_head(self) -> None:
        """Until the head's GCS port accepts connections; fails at once if `ray start --head` exits."""
        ip, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise ClusterError(f"ray start --head exited with {self.procs[0].returncode} (logs: "
                                   f"{self.temp_dir}/session_latest/logs)")
            try:
                with socket.create_connection((ip, int(port)), timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise ClusterError(f"the Ray head at {self.address} did not listen within {JOIN_TIMEOUT_S} s (logs: "
                           f"{self.temp_dir}/session_latest/logs)")

    def _wait(self) -> None:
        env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        try:
            proc = subprocess.run([sys.executable, "-c", _COUNT, self.address, str(self.n), str(JOIN_TIMEOUT_S)],
                                  env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S + 120)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"Ray at {self.address} did not answer within {JOIN_TIMEOUT_S} s") from None
        got = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not got.isdigit():
            raise ClusterError(f"Ray at {self.address} did not start: {proc.stderr.strip().splitlines()[-1:]}")
        if int(got) < self.n:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            raise ClusterError(f"only {got} of {self.n} Ray nodes joined {self.address} within {JOIN_TIMEOUT_S} s"
                               + (f" ({', '.join(dead)} exited)" if dead else ""))
        self.log(f"[ctpo] Ray cluster {self.address}: {got} nodes")

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):  # the workers' step first (its nodes drain through the live head), then the head
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs = []
