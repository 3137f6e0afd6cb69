"""One pin set: pyproject.toml is the source; envs/ is generated from it; both agree with verl 0.9.1's own
requirements; the CPU venv runs the same versions as the GPU set except torch and numpy."""
from __future__ import annotations

import importlib.util
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from ctpo.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("pins", REPO_ROOT / "envs" / "pins.py")
pins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pins)


def _exact(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        r = Requirement(s)
        out[r.name.lower().replace("_", "-")] = next(x.version for x in r.specifier if x.operator == "==")
    return out


def test_envs_are_generated_from_pyproject_and_agree_with_verl():
    assert pins.check() == []


def test_gpu_set_is_verl_vllm_own_pins():
    gpu = _exact(pins.pin_list(("gpu", "flash-attn")))
    verl = {Requirement(r).name.lower(): Requirement(r) for r in metadata.requires("verl")
            if 'extra == "vllm"' in r or 'extra == "flash-attn-cu130torch211"' in r}
    for name in ("torch", "transformers", "vllm", "flash-attn"):
        assert str(verl[name].specifier) == f"=={gpu[name]}", name
    assert pins.pip_section(pins.render()["gpu.yaml"]) == pins.pin_list(("gpu", "jobs"))


def test_check_names_the_file_that_disagrees(tmp_path, monkeypatch):
    bad = (REPO_ROOT / "pyproject.toml").read_text().replace('"transformers==5.9.0"', '"transformers==5.10.4"')
    (tmp_path / "pyproject.toml").write_text(bad)
    (tmp_path / "envs").mkdir()
    for name, text in pins.render().items():
        (tmp_path / "envs" / name).write_text(text)
    monkeypatch.setattr(pins, "ROOT", tmp_path)
    monkeypatch.setattr(pins, "ENVS", tmp_path / "envs")
    problems = pins.check()
    assert "pyproject.toml: transformers==5.10.4 violates verl[vllm] 0.9.1's 'transformers==5.9.0'" in problems
    # the env files were rendered from the good pyproject: they no longer match the edited one
    assert any(p.startswith("envs/gpu.yaml: differs") for p in problems)


def test_cpu_venv_runs_the_gpu_set_versions():
    """What the tests exercise is what runs on the GPU: every core pin is the installed version here."""
    wrong = {name: (want, metadata.version(name)) for name, want in _exact(pins.pin_list(())).items()
             if metadata.version(name) != want}
    assert wrong == {}


def test_flash_attn_is_a_separate_no_build_isolation_step():
    script = pins.render()["gpu.post-deploy.sh"]
    assert "pip install --no-build-isolation flash-attn==2.8.3" in script
    assert "flash-attn" not in (REPO_ROOT / "envs" / "gpu.yaml").read_text().split("dependencies:")[1]
