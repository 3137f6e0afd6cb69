"""ctpo.slurm: `sinfo` output -> partition limits, a job's request per node, and the one-line verdict.
Expected values are worked out by hand from the sinfo lines below."""
from __future__ import annotations

import pytest

from ctpo.slurm import check_request, parse_gres, parse_sinfo, parse_time, profile_defaults, request

SINFO = """gpu* 2-00:00:00 1031000 gpu:h100:8(S:0-1) 96
gpu* 2-00:00:00 515000 gpu:h100:4(S:0) 48
a100 12:00:00 256000+ gpu:a100:4,nvme:1 64
cpu 1-00:00:00 514000 (null) 128
debug 30:00 64000 (null) 16
long infinite 128000 gpu:2 32
"""


@pytest.mark.parametrize("text,minutes", [("2-00:00:00", 2880), ("1-12:30:00", 2190), ("12:00:00", 720),
                                          ("30:00", 30), ("45", 45), ("infinite", None), ("UNLIMITED", None)])
def test_time_limits(text, minutes):
    assert parse_time(text) == minutes


def test_gres_and_partitions():
    assert parse_gres("gpu:h100:8(S:0-1)") == {"h100": 8}
    assert parse_gres("gpu:a100:4,nvme:1") == {"a100": 4} and parse_gres("gpu:2") == {"": 2}
    assert parse_gres("(null)") == {}
    parts = parse_sinfo(SINFO)
    assert set(parts) == {"gpu", "a100", "cpu", "debug", "long"}  # the default's * dropped
    assert parts["gpu"].time_min == 2880 and [g.mem_mb for g in parts["gpu"].groups] == [1031000, 515000]
    assert parts["a100"].groups[0].mem_mb == 256000 and parts["long"].time_min is None


def test_request_per_node():
    # 8 GPUs x 12 CPUs x 10000 MB per CPU, one node: 96 CPUs, 960000 MB
    assert request({"slurm_partition": "gpu", "gpu": 8, "gpu_model": "h100", "cpus_per_gpu": 12,
                    "mem_mb_per_cpu": 10000, "mem_mb": 16000, "runtime": 600, "nodes": 1}) == {
        "partition": "gpu", "time_min": 600, "nodes": 1, "gpus": 8, "gpu_type": "h100", "cpus": 96, "mem_mb": 960000}
    # 16 GPUs over 2 nodes: 8 per node, 64 CPUs and 640000 MB per node
    r = request({"gres": "gpu:h100:16", "cpus_per_gpu": 8, "mem_mb_per_cpu": 10000, "nodes": 2})
    assert (r["gpus"], r["gpu_type"], r["cpus"], r["mem_mb"]) == (8, "h100", 64, 640000)
    # `gpu` with more than one node is per node (the ctpo-slurm executor's --gres=gpu:<model>:<gpu>)
    r = request({"gpu": 8, "gpu_model": "h100", "cpus_per_gpu": 12, "mem_mb_per_cpu": 10000, "nodes": 2})
    assert (r["nodes"], r["gpus"], r["gpu_type"], r["cpus"], r["mem_mb"]) == (2, 8, "h100", 96, 960000)
    assert request({"cpus_per_task": 16, "mem_mb": 256000})["cpus"] == 16


def test_verdicts():
    parts = parse_sinfo(SINFO)
    gpu = {"slurm_partition": "gpu", "gpu": 8, "gpu_model": "h100", "cpus_per_gpu": 12, "runtime": 2880}
    assert check_request("train", {**gpu, "mem_mb_per_cpu": 10739}, parts) is None  # 96 x 10739 = 1030944
    assert check_request("train", {**gpu, "mem_mb_per_cpu": 10740}, parts) == (  # 1031040 > 1031000
        "train: partition 'gpu': no node fits 8 x h100 GPU, 96 CPUs, 1031040 MB per node (its nodes: 8 x h100 GPU, "
        "96 CPUs, 1031000 MB; 4 x h100 GPU, 48 CPUs, 515000 MB; sinfo %G %c %m)")
    assert check_request("eval", {**gpu, "gpu": 4, "mem_mb_per_cpu": 10000}, parts) is None
    assert check_request("train", {**gpu, "gpu_model": "a100", "mem_mb_per_cpu": 1}, parts).startswith(
        "train: partition 'gpu': no node fits 8 x a100 GPU")
    assert check_request("train", {**gpu, "runtime": 2881}, parts) == (
        "train: partition 'gpu': runtime 2881 min exceeds its time limit of 2880 min (sinfo %l)")
    assert check_request("x", {"slurm_partition": "long", "gpu": 2, "runtime": 10 ** 6}, parts) is None
    assert check_request("x", {"slurm_partition": "gpux"}, parts) == (
        "x: partition 'gpux' is not one of the cluster's partitions (a100, cpu, debug, gpu, long; sinfo)")


def test_profile_defaults_share_the_largest_gpu_node_evenly():
    parts = parse_sinfo(SINFO)
    assert profile_defaults(parts["gpu"]) == {"runtime": 2880, "gpu_model": "h100", "cpus_per_gpu": 12,
                                              "mem_mb_per_cpu": 1031000 // 96}
    assert profile_defaults(parts["long"]) == {"cpus_per_gpu": 16, "mem_mb_per_cpu": 4000}  # untyped GPUs, no limit
    assert profile_defaults(parts["debug"]) == {"runtime": 30}  # no GPUs: only the time limit
