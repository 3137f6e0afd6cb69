"""The TIR chat format, read from `configs/tir/<template>.yaml` (the one place it is defined).

A template file holds: `system_prompt`, `user` (with `{question}`), `chat` (the Qwen3 chat strings
`system`, `user`, `assistant`, `no_think`), `stop` (generation stop strings ending a code turn),
`observation` (with `{output}`) and `code_prelude` (prepended to every executed code block).

    render_prompt(q, "qwen3_tir") ==
        "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n"
        "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n"          # thinking disabled (paper)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from ctpo.config import CONFIG_DIR, ConfigError

TIR_DIR = CONFIG_DIR / "tir"
_CHAT_KEYS = ("system", "user", "assistant", "no_think")


@dataclass(frozen=True)
class TIRTemplate:
    """A parsed `configs/tir/<name>.yaml`."""

    name: str
    system_prompt: str
    user: str
    chat_system: str
    chat_user: str
    chat_assistant: str
    chat_no_think: str
    stop: tuple[str, ...]
    observation: str
    code_prelude: str
    canonical: str  # canonical JSON of the file's content (what template_hash hashes)


def _require(data: dict, key: str, path: Path, kind: type):
    if key not in data:
        raise ConfigError(f"{path}: missing key '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: key '{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


@lru_cache(maxsize=None)
def load_template(template: str, tir_dir: Path = TIR_DIR) -> TIRTemplate:
    """Load and validate `tir_dir/<template>.yaml`; unknown or missing keys raise ConfigError."""
    path = Path(tir_dir) / f"{template}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in Path(tir_dir).glob("*.yaml"))
        raise ConfigError(f"{path}: no such TIR template '{template}' (have: {have})")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = {"name", "system_prompt", "user", "chat", "stop", "observation", "code_prelude"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} (expected {sorted(known)})")
    chat = _require(data, "chat", path, dict)
    for k in _CHAT_KEYS:
        _require(chat, k, path, str)
    if set(chat) - set(_CHAT_KEYS):
        raise ConfigError(f"{path}: unknown chat key(s) {sorted(set(chat) - set(_CHAT_KEYS))}")
    stop = _require(data, "stop", path, list)
    if not stop or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{path}: key 'stop' must be a non-empty list of non-empty strings")
    user = _require(data, "user", path, str)
    if "{question}" not in user:
        raise ConfigError(f"{path}: key 'user' must contain the placeholder {{question}}")
    observation = _require(data, "observation", path, str)
    if "{output}" not in observation:
        raise ConfigError(f"{path}: key 'observation' must contain the placeholder {{output}}")
    return TIRTemplate(
        name=_require(data, "name", path, str),
        system_prompt=_require(data, "system_prompt", path, str),
        user=user,
        chat_system=chat["system"],
        chat_user=chat["user"],
        chat_assistant=chat["assistant"],
        chat_no_think=chat["no_think"],
        stop=tuple(stop),
        observation=observation,
        code_prelude=_require(data, "code_prelude", path, str),
        canonical=json.dumps(data, sort_keys=True, separators=(",", ":")),
    )


def render_prompt(question: str, template: str, enable_thinking: bool = False) -> str:
    """The full prompt text up to and including the assistant header (and, with thinking disabled as in
    the paper, Qwen3's empty think block). Pass `cfg.rollout.enable_thinking` explicitly."""
    t = load_template(template)
    # str.replace, not str.format: questions hold LaTeX braces
    user = t.user.replace("{question}", question)
    text = t.chat_system.replace("{system_prompt}", t.system_prompt)
    text += t.chat_user.replace("{user}", user)
    text += t.chat_assistant
    if not enable_thinking:
        text += t.chat_no_think
    return text


def template_hash(template: str) -> str:
    """sha256 of the template file's canonical content: recorded with results for provenance."""
    return hashlib.sha256(load_template(template).canonical.encode()).hexdigest()
