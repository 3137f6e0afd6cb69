"""Which tool protocol a run uses (`rollout.protocol`): its names and config files. No verl import. The verl
overrides that select it are built with the rest of the command (`ctpo.train.verl_command`).

    ctpo_tir  our SimpleTIR-style loop (`ctpo.agent.verl_loop`, agent loop `ctpo_tir`): a turn stops at
              the closing code fence, the output is inlined as "Code execution result: ..." (mask 0),
              system prompt and limits from configs/tir/<template>.yaml and RolloutConfig. The toy uses it.
    release   the authors' release (`ctpo.agent.release_protocol`): verl's own ToolAgentLoop (agent loop
              `ctpo_release` = ToolAgentLoop + the release's system prompt), Hermes tool calls with the
              release's fenced-code fallback (tool parser `hermes_fallback`), each assistant turn runs to
              end of sequence, the output comes back as a `tool` chat message rendered by the model's chat
              template; tool `code_interpreter` from configs/verl/release_tool_config.yaml.

docs/TOOL_PROTOCOL.md maps both to the release, field by field.
"""
from __future__ import annotations

from pathlib import Path

from ctpo.config import AGENT_LOOPS, CONFIG_DIR, PROTOCOLS, ConfigError

AGENT_LOOP_CONFIG = CONFIG_DIR / AGENT_LOOPS
TIR_LOOP, _tir_tools = PROTOCOLS["ctpo_tir"]
RELEASE_LOOP, _release_tools = PROTOCOLS["release"]
TIR_TOOL_CONFIG = CONFIG_DIR / _tir_tools
RELEASE_TOOL_CONFIG = CONFIG_DIR / _release_tools
RELEASE_PARSER = "hermes_fallback"
RELEASE_MAX_PARALLEL_CALLS = 1  # verl's default and the release's: one call runs per assistant turn
RELEASE_TRUNCATE_SIDE = "middle"  # verl's default and the release's for max_tool_response_length


def release_system_prompt(path: str | Path = AGENT_LOOP_CONFIG) -> str:
    """The release's system prompt: the `system_prompt` of the `ctpo_release` entry in agent_loop.yaml."""
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(path))
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and e.get("name") == RELEASE_LOOP:
            prompt = e.get("system_prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"{path}: entry '{RELEASE_LOOP}' needs a non-empty string 'system_prompt'")
            return prompt
    raise ConfigError(f"{path}: no agent loop entry named '{RELEASE_LOOP}'")


def protocol_hash(protocol: str, template: str) -> str:
    """sha256 identifying what the model sees: the TIR template (ctpo_tir) or the release's system prompt
    and tool config file (release). Recorded with evaluation results."""
    import hashlib

    if protocol == "ctpo_tir":
        from ctpo.agent.template import template_hash

        return template_hash(template)
    h = hashlib.sha256()
    h.update(release_system_prompt().encode())
    h.update(b"\0")
    h.update(RELEASE_TOOL_CONFIG.read_bytes())
    return h.hexdigest()
