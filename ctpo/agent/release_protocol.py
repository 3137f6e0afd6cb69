"""The authors' release tool protocol on stock verl 0.9.1 (`rollout.protocol: release`), registered, not forked.

Importing this module registers, in verl's own registries:
- tool parser `hermes_fallback` (`HermesFallbackToolParser`): verl's Hermes parser (`<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`); when it finds no call, the release's fallback (its `VERL_HERMES_FALLBACK=1`
  branch): first raw JSON `{"name": ..., "arguments": {...}}` objects, else every non-empty fenced
  ```python / ```py / ``` block becomes a `code_interpreter` call `{"code": <block>, "timeout": 30}`.
  verl's ToolAgentLoop runs the first `multi_turn.max_parallel_calls` (= 1) of them.
- agent loop `ctpo_release` (`ReleaseToolAgentLoop`): verl's `ToolAgentLoop` unchanged, plus the release's
  system prompt (prepended as the release's tool_agent_loop.py does) and, ctpo's rule, an all-zero
  response mask for a trajectory whose sandbox infrastructure failed (it must not train as a wrong answer).
- tool `code_interpreter` (`CodeInterpreterTool`, configs/verl/release_tool_config.yaml): the release's
  argument handling and output text, executed in ctpo's isolating sandbox (`ctpo.sandbox`, public API).

Each assistant turn runs to end of sequence (no stop strings); verl appends the tool result as a `tool`
chat message rendered by the chat template (Qwen3: `<|im_start|>user\\n<tool_response>\\n...`), truncated
to `multi_turn.max_tool_response_length` characters by verl. The evaluation path runs this same loop class
(`ctpo.agent.release_episodes`). docs/TOOL_PROTOCOL.md has the mapping to the release.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Callable

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, HermesToolParser, ToolParser
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.ray_utils import get_event_loop

from ctpo.agent.protocols import RELEASE_LOOP, RELEASE_PARSER, RELEASE_TOOL_CONFIG
from ctpo.agent.turns import CODE_BLOCK_RE, execute_with_retry
from ctpo.agent.verl_tool import check_config_keys
from ctpo.config import ConfigError

log = logging.getLogger(__name__)

TOOL_NAME = "code_interpreter"
FALLBACK_TIMEOUT_S = 30  # the release's fallback call carries {"timeout": 30}
TIMEOUT_BOUNDS = (1, 300)  # the release's _parse_timeout clamp (before the max_timeout_s cap)
# the release's raw-JSON fallback: {"name": "...", "arguments": {...}} anywhere in the turn
JSON_CALL_RE = re.compile(
    r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*(?P<arguments>\{.*?\})\s*\}', re.DOTALL
)
FENCE_RE = re.compile(r"```(?:py|python)?\n(.*?)\n```", re.DOTALL)  # every block (the release's finditer)
INFRA_TEXT = "sandbox request failed: sandbox infrastructure error"
# Chat-control strings a program could print (Qwen3's <|...|> specials and its tool/think tags). verl renders
# the tool message with the chat template and tokenizes the result, where they would become the real control
# tokens (a forged end of turn); a zero-width space after the `<` keeps them text (issue 21; not in the release).
CONTROL_RE = re.compile(r"<(?=\|[A-Za-z0-9_]{1,40}\|>|/?(?:tool_call|tool_response|think)>)")
ZWSP = "\u200b"
# Harness text the reward must not read (ctpo.agent.release_episodes): this tool's truncation marker and
# verl's own (tool_agent_loop, tool_response_truncate_side left | right | middle).
HARNESS_RE = re.compile(r"\n\.\.\.\[truncated \d+ chars\]|\.\.\.\(truncated\)\.\.\.|\(truncated\)\.\.\.|\.\.\.\(truncated\)")
COUNTERS = ("tool_calls", "infra_failures")  # per-trajectory extra_fields written by the tool


# ----------------------------------------------------------------------------- parser


def fallback_calls(text: str) -> list[FunctionCall]:
    """The release's fallback on a turn without a Hermes call: raw JSON calls, else fenced code blocks."""
    calls = []
    for m in JSON_CALL_RE.finditer(text):
        try:
            args = json.loads(m.group("arguments"))
        except ValueError:
            continue
        if isinstance(args, dict):
            calls.append(FunctionCall(name=m.group("name"), arguments=json.dumps(args, ensure_ascii=False)))
    if calls:
        return calls
    for m in FENCE_RE.finditer(text):
        code = (m.group(1) or "").strip()
        if code:
            args = {"code": code, "timeout": FALLBACK_TIMEOUT_S}
            calls.append(FunctionCall(name=TOOL_NAME, arguments=json.dumps(args, ensure_ascii=False)))
    return calls


@ToolParser.register(RELEASE_PARSER)
class HermesFallbackToolParser(HermesToolParser):
    """verl's Hermes parser, then the release's fallback (`fallback_calls`) when it found no call."""

    async def extract_tool_calls(self, responses_ids: list[int], tools: list[OpenAIFunctionToolSchema] = None):
        content, calls = await super().extract_tool_calls(responses_ids, tools)
        if calls:
            return content, calls
        text = await get_event_loop().run_in_executor(None, self.tokenizer.decode, responses_ids)
        return text, fallback_calls(text)


# ----------------------------------------------------------------------------- tool

CONFIG_KEYS = {
    "type": str, "default_timeout_s": (int, float), "max_timeout_s": (int, float), "max_code_chars": int,
    "max_output_chars": int, "languages": list, "concurrency": int,
}


def check_tool_config(config: dict, source: str = str(RELEASE_TOOL_CONFIG)) -> dict:
    """The tool's `config` block: exactly CONFIG_KEYS, each of its type (one-line errors)."""
    check_config_keys(config, CONFIG_KEYS, f"{source}: code_interpreter")
    if not 0 < config["default_timeout_s"] <= config["max_timeout_s"]:
        raise ConfigError(f"{source}: need 0 < default_timeout_s <= max_timeout_s")
    if not config["languages"] or not all(isinstance(x, str) for x in config["languages"]):
        raise ConfigError(f"{source}: 'languages' must be a non-empty list of strings")
    return config


def load_tool_config(path=RELEASE_TOOL_CONFIG) -> tuple[dict, dict]:
    """(config, tool_schema) of the single tool in the release tool config file."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    tools = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(tools, list) or len(tools) != 1:
        raise ConfigError(f"{path}: expected 'tools' to hold exactly one tool")
    entry = tools[0]
    if entry.get("class_name") != f"{__name__}.CodeInterpreterTool":
        raise ConfigError(f"{path}: tools[0].class_name must be {__name__}.CodeInterpreterTool")
    schema = entry.get("tool_schema")
    if not isinstance(schema, dict) or schema.get("function", {}).get("name") != TOOL_NAME:
        raise ConfigError(f"{path}: tools[0].tool_schema must describe the function '{TOOL_NAME}'")
    return check_tool_config(dict(entry.get("config") or {}), str(path)), schema


def parse_timeout(value: Any, default: float) -> int:
    """The release's `_parse_timeout`: int(float(str(value))) clamped to [1, 300]; unparsable -> default."""
    if value is None:
        return int(default)
    try:
        t = int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        return int(default)
    return max(TIMEOUT_BOUNDS[0], min(t, TIMEOUT_BOUNDS[1]))


def _truncate(text: str, max_chars: int) -> str:
    """The release's per-stream cut: head, then a marker naming how many characters were dropped."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n...[truncated {len(text) - max_chars} chars]"


def neutralize_control(text: str) -> str:
    """`text` with every chat-control string (CONTROL_RE) broken by a zero-width space after its `<`."""
    return CONTROL_RE.sub("<" + ZWSP, text)


def strip_harness(text: str) -> str:
    """`text` without the truncation markers (HARNESS_RE): what the reward may read."""
    return HARNESS_RE.sub("", text)


def release_output_text(result, max_output_chars: int) -> str:
    """What the release's tool returns for an ExecResult: stdout + stderr (each cut to max_output_chars);
    a timeout shows the release sandbox's "Timeout\\n" (its partial output is dropped there); an empty
    failing run shows "sandbox status: runtime_error". Printed chat-control strings are neutralized."""
    if result.status == "timeout":
        return "Timeout\n"
    text = _truncate(result.stdout or "", max_output_chars) + _truncate(result.stderr or "", max_output_chars)
    if not text and result.status != "ok":
        return "sandbox status: runtime_error"
    return neutralize_control(text)


class CodeInterpreterTool(BaseTool):
    """The release's `code_interpreter` on ctpo's sandbox. config: CONFIG_KEYS (release_tool_config.yaml).

    sandbox: an object with `run_many(codes, timeout_s=...)` (default: a `ctpo.sandbox.SandboxPool` with
    `concurrency`, built here so a host without isolation fails before any rollout)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None, sandbox=None) -> None:
        config = check_tool_config(dict(config))
        if tool_schema is None:
            tool_schema = OpenAIFunctionToolSchema.model_validate(load_tool_config()[1])
        if tool_schema.function.name != TOOL_NAME:
            raise ConfigError(f"{RELEASE_TOOL_CONFIG}: the tool must be named '{TOOL_NAME}'")
        super().__init__(config, tool_schema)
        self.default_timeout_s = float(config["default_timeout_s"])
        self.max_timeout_s = float(config["max_timeout_s"])
        self.max_code_chars = int(config["max_code_chars"])
        self.max_output_chars = int(config["max_output_chars"])
        self.languages = {str(x).strip().lower() for x in config["languages"]}
        if sandbox is None:
            from ctpo.sandbox import SandboxLimits, SandboxPool

            sandbox = SandboxPool(config["concurrency"], SandboxLimits(timeout_s=self.default_timeout_s))
        self._sandbox = sandbox

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return self.tool_schema

    def prepare(self, parameters: dict) -> tuple[str | None, float, str | None]:
        """(code, timeout_s, None) to run, or (None, 0, message) for a refused call (the release's rules)."""
        if not isinstance(parameters, dict):
            return None, 0.0, "sandbox blocked: arguments must be a JSON object"
        timeout = parse_timeout(parameters.get("timeout", self.default_timeout_s), self.default_timeout_s)
        language = str(parameters.get("language", "python")).strip().lower()
        if language not in self.languages:
            return None, 0.0, f"sandbox blocked unsupported language: {language}"
        timeout = min(float(timeout), self.max_timeout_s)
        code = parameters.get("code", "")
        code = (code if isinstance(code, str) else str(code))[: self.max_code_chars]
        m = CODE_BLOCK_RE.search(code)  # a call whose code is itself a fenced block runs the block
        if m:
            code = m.group(1).strip()
        return code, timeout, None

    def run_sync(self, code: str, timeout_s: float) -> tuple[Any, int]:
        """Run one program (infra failures retried, `ctpo.agent.turns.execute_with_retry`)."""
        run: Callable = lambda codes: self._sandbox.run_many(list(codes), timeout_s=timeout_s)  # noqa: E731
        results, attempts = execute_with_retry([code], run)
        return results[0], attempts[0]

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        extra = _extra_fields(kwargs.get("agent_data"))
        code, timeout, refused = self.prepare(parameters)
        if refused is not None:
            _count(extra, "tool_calls")
            return ToolResponse(text=refused), 0.0, {"status": "refused"}
        result, attempts = await asyncio.get_running_loop().run_in_executor(None, self.run_sync, code, timeout)
        _count(extra, "tool_calls")
        extra.setdefault("tool_statuses", []).append(result.status)
        metrics = {"status": result.status, "attempts": attempts, "infra_failure": int(result.status == "infra")}
        if result.status == "infra":  # persisted after retries: the loop masks this trajectory
            _count(extra, "infra_failures")
            return ToolResponse(text=INFRA_TEXT), 0.0, metrics
        return ToolResponse(text=release_output_text(result, self.max_output_chars)), 0.0, metrics


def _extra_fields(agent_data) -> dict:
    return agent_data.extra_fields if agent_data is not None and hasattr(agent_data, "extra_fields") else {}


def _count(extra: dict, key: str) -> None:
    extra[key] = int(extra.get(key, 0)) + 1


# ----------------------------------------------------------------------------- agent loop


def with_system_prompt(messages, system_prompt: str) -> list[dict]:
    """The release's rule: prepend `system_prompt` to an existing system message (unless it already holds
    it), else insert it as the first message. Returns new message dicts (the dataset's are not mutated)."""
    msgs = [dict(m) for m in list(messages)]
    if msgs and msgs[0].get("role") == "system":
        existing = msgs[0].get("content", "")
        if system_prompt not in existing:
            msgs[0]["content"] = f"{system_prompt}\n\n{existing}"
        return msgs
    return [{"role": "system", "content": system_prompt}, *msgs]


@register(RELEASE_LOOP)
class ReleaseToolAgentLoop(ToolAgentLoop):
    """verl's ToolAgentLoop with the release's system prompt; a trajectory with a persistent sandbox
    infrastructure failure gets an all-zero response mask. system_prompt: from configs/verl/agent_loop.yaml."""

    def __init__(self, *args, system_prompt: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise ConfigError(f"agent loop '{RELEASE_LOOP}': 'system_prompt' must be a non-empty string")
        if self.tool_parser_name != RELEASE_PARSER:
            raise ConfigError(
                f"agent loop '{RELEASE_LOOP}': actor_rollout_ref.rollout.multi_turn.format must be "
                f"'{RELEASE_PARSER}', got '{self.tool_parser_name}'"
            )
        self.system_prompt = system_prompt

    async def run(self, sampling_params: dict[str, Any], **kwargs):
        kwargs["raw_prompt"] = with_system_prompt(kwargs["raw_prompt"], self.system_prompt)
        out = await super().run(sampling_params, **kwargs)
        for key in COUNTERS:
            out.extra_fields.setdefault(key, 0)
        out.extra_fields.setdefault("tool_statuses", [])
        if out.extra_fields["infra_failures"]:
            out.response_mask = [0] * len(out.response_mask)
        return out
