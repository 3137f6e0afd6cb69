"""`PythonSandboxTool`: verl `BaseTool` running a Python program in ctpo's sandbox.

Configured through `actor_rollout_ref.rollout.multi_turn.tool_config_path=configs/verl/tool_config.yaml`.
Same observation text and infra-retry rule as the TIR loop (`ctpo.agent.turns`). An infrastructure
failure that persists after retries is never shown to the model as an error: the response is empty
and the metrics carry `infra_failure = 1`.
"""
from __future__ import annotations

import asyncio
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from ctpo.agent.template import load_template
from ctpo.agent.turns import execute_with_retry, format_observation
from ctpo.config import ConfigError

DEFAULT_SCHEMA = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "Run a Python program in a sandbox and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python program to run."}},
            "required": ["code"],
        },
    },
}
CONFIG_KEYS = {"type": str, "template": str, "timeout_s": (int, float), "obs_max_chars": int, "concurrency": int}


def check_config_keys(config: dict, keys: dict, what: str) -> dict:
    """`config` holds exactly `keys` (name -> type or tuple of types; a bool never passes as a number);
    else a one-line ConfigError naming `what` and the key. Both tools' config blocks go through it."""
    for key, kind in keys.items():
        if key not in config:
            raise ConfigError(f"{what} config is missing key '{key}'")
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise ConfigError(f"{what} config key '{key}' has the wrong type")
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ConfigError(f"{what} config has unknown key(s) {unknown}")
    return config


def check_tool_config(config: dict) -> dict:
    """The tool's `config` block: every key in CONFIG_KEYS, nothing else (one-line errors)."""
    return check_config_keys(config, CONFIG_KEYS, "tool_config: PythonSandboxTool")


class PythonSandboxTool(BaseTool):
    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None, sandbox=None) -> None:
        """config: see CONFIG_KEYS. sandbox: a `SandboxPool`-like object with `run_many(codes)` (default: a
        `SandboxPool` with the config's timeout and concurrency)."""
        self._schema = tool_schema or OpenAIFunctionToolSchema.model_validate(DEFAULT_SCHEMA)
        super().__init__(check_tool_config(dict(config)), self._schema)
        self.template = load_template(config["template"])
        self.timeout_s = float(config["timeout_s"])
        if sandbox is not None:
            self._run_batch = sandbox.run_many
        else:  # verl loads tools once per worker: one pool bounds concurrent executions
            from ctpo.sandbox import SandboxLimits, SandboxPool

            self._run_batch = SandboxPool(config["concurrency"], SandboxLimits(timeout_s=self.timeout_s)).run_many

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return self._schema

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        code = parameters.get("code") if isinstance(parameters, dict) else None
        if not isinstance(code, str) or not code.strip():
            return ToolResponse(text="Error: parameter 'code' must be a non-empty string"), 0.0, {"status": "error"}
        loop = asyncio.get_running_loop()
        results, attempts = await loop.run_in_executor(
            None, execute_with_retry, [self.template.code_prelude + code], self._run_batch
        )
        r = results[0]
        metrics = {"status": r.status, "attempts": attempts[0], "infra_failure": int(r.status == "infra")}
        if r.status == "infra":
            return ToolResponse(text=""), 0.0, metrics
        return ToolResponse(text=format_observation(r, self.template, self.config["obs_max_chars"])), 0.0, metrics
