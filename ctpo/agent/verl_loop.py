"""`CtpoTirAgentLoop`: the TIR loop inside verl's multi-turn rollout (agent name `ctpo_tir`).

Enable with `actor_rollout_ref.rollout.agent.agent_loop_config_path=configs/verl/agent_loop.yaml` and
`actor_rollout_ref.rollout.agent.default_agent_loop=ctpo_tir` (or a dataset column `agent_name`).
The YAML entry's `rollout` mapping holds the ctpo-only `RolloutConfig` fields (template, obs_max_chars,
sandbox_*, void_turn_masking, enable_thinking; unknown keys raise). The budgets verl already has come
from verl's own config, so they exist once: `max_turns` <- `multi_turn.max_assistant_turns` (when
set), `max_obs_tokens` <- `multi_turn.max_tool_response_length`, `max_response_tokens` <-
`rollout.response_length`.

Generation goes through verl's async server manager (token ids in, token ids + log-probs out); the
turn rule, observations and infra retries are `ctpo.agent.turns` (the same code as the CPU loop).
Trajectories that SimpleTIR masks (finish "void" with `void_turn_masking`) and trajectories whose
sandbox infrastructure failed (finish "infra") get an all-zero `response_mask`: they add nothing to
the loss. `extra_fields` carries finish_reason, tool_calls, infra_failures and void for metrics, and
verl's weight-version tags `min_global_steps` (first turn) / `max_global_steps` (last turn) from the
server outputs, as verl's `tool_agent` loop does: verl's V1 trainer converts them to int after each step.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any
from uuid import uuid4

from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, _agent_loop_registry, register

from ctpo.agent.loop import sandbox_runner
from ctpo.agent.template import load_template, render_prompt
from ctpo.agent.turns import EpisodeState, execute_with_retry
from ctpo.config import ConfigError, RolloutConfig
from ctpo.tokenizer import hf_encode_plain

MASKED_FINISHES = ("void", "infra")
_POOLS: dict = {}  # (concurrency, timeout_s) -> SandboxPool shared by every trajectory in this worker
_POOLS_LOCK = threading.Lock()


def shared_sandbox(cfg: RolloutConfig):
    """One `SandboxPool` per worker process and setting: verl builds an agent loop per trajectory, and
    the pool bounds concurrent executions across all of them to `sandbox_concurrency`."""
    key = (cfg.sandbox_concurrency, cfg.sandbox_timeout_s)
    with _POOLS_LOCK:
        if key not in _POOLS:
            from ctpo.sandbox import SandboxPool

            _POOLS[key] = SandboxPool.for_rollout(cfg)
        return _POOLS[key]


def rollout_config_from(overrides) -> RolloutConfig:
    """RolloutConfig defaults <- `overrides` (dict / DictConfig / None); unknown keys raise ConfigError."""
    base = OmegaConf.structured(RolloutConfig)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(dict(overrides or {})))
    except Exception as e:
        raise ConfigError(f"configs/verl/agent_loop.yaml: bad 'rollout' entry: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def question_from_messages(messages) -> str:
    """The last user message's text (verl's `raw_prompt` is a list of chat messages)."""
    for m in reversed(list(messages)):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                return "".join(c.get("text", "") for c in content if isinstance(c, dict))
    raise ValueError("raw_prompt: no user message with text content")


def register_unless_configured(name: str):
    """verl's `register(name)`, except when the run's agent_loop.yaml already registered `name`.

    verl's AgentLoopWorker loads agent_loop_config_path into its registry (the entry with our `rollout`)
    before anything imports this module; the first trajectory's instantiation imports it, and a plain
    `register` would then replace that entry with a bare `{_target_}`: every later trajectory ran with
    RolloutConfig defaults (the qwen3_tir template, not the run's) while the first ran as configured."""

    def decorator(cls):
        return cls if name in _agent_loop_registry else register(name)(cls)

    return decorator


@register_unless_configured("ctpo_tir")
class CtpoTirAgentLoop(AgentLoopBase):
    def __init__(self, *args, tools=None, rollout=None, sandbox=None, **kwargs):
        """args/kwargs: verl's AgentLoopBase arguments (trainer_config, server_manager, tokenizer, ...).
        rollout: RolloutConfig overrides. sandbox: a `run_many` object (default: the worker-wide
        `shared_sandbox`; tests pass doubles). tools: unused, the loop runs code itself."""
        super().__init__(*args, **kwargs)
        self.cfg = rollout_config_from(rollout)
        multi_turn = self.rollout_config.multi_turn
        if multi_turn.max_assistant_turns is not None:
            self.cfg.max_turns = int(multi_turn.max_assistant_turns)
        self.cfg.max_obs_tokens = int(multi_turn.max_tool_response_length)
        self.cfg.max_response_tokens = int(self.rollout_config.response_length)
        self.template = load_template(self.cfg.template)
        self.run_batch = sandbox_runner(self.cfg, sandbox if sandbox is not None else shared_sandbox(self.cfg))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_plain(self, text: str) -> list[int]:
        """Printed text as text: no special or added token (`ctpo.tokenizer.hf_encode_plain`)."""
        return hf_encode_plain(self.tokenizer, text)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        question = question_from_messages(kwargs["raw_prompt"])
        prompt_ids = self._encode(render_prompt(question, self.cfg.template, enable_thinking=self.cfg.enable_thinking))
        state = EpisodeState.from_rollout_config(prompt_ids, self.cfg)
        versions = await run_turns(state, self, sampling_params, uuid4().hex)
        mask = list(state.response_mask)
        if state.finish_reason in MASKED_FINISHES:
            mask = [0] * len(mask)
        return AgentLoopOutput(
            prompt_ids=state.prompt_ids,
            response_ids=state.response_ids,
            response_mask=mask,
            response_logprobs=state.response_logprobs,
            num_turns=1 + state.turns + state.tool_calls,  # user + assistant + tool messages
            metrics={},
            extra_fields={
                "finish_reason": state.finish_reason,
                "tool_calls": state.tool_calls,
                "infra_failures": state.infra_failures,
                "void": int(state.finish_reason == "void"),
                **versions,
            },
        )


WEIGHT_VERSION_KEYS = ("min_global_steps", "max_global_steps")


def merge_weight_versions(versions: dict, extra_fields: dict) -> None:
    """verl's `tool_agent` rule: the first turn's tags start the trajectory, later turns raise the max."""
    if not versions:
        versions.update({k: extra_fields[k] for k in WEIGHT_VERSION_KEYS if k in extra_fields})
    elif extra_fields.get("max_global_steps") is not None:
        versions["max_global_steps"] = extra_fields["max_global_steps"]


async def run_turns(state: EpisodeState, agent: CtpoTirAgentLoop, sampling_params: dict, request_id: str) -> dict:
    """Drive one episode: generate a turn with `agent.server_manager`, run its code, repeat. Returns the
    trajectory's weight-version tags ({min,max}_global_steps) from the server outputs."""
    loop = asyncio.get_running_loop()
    versions: dict = {}
    eos = agent.tokenizer.eos_token_id
    while state.live and state.turns < state.max_turns:
        budget = state.remaining
        sp = dict(sampling_params)
        sp.update(max_tokens=budget, stop=list(agent.template.stop), include_stop_str_in_output=True, logprobs=True)
        out = await agent.server_manager.generate(request_id=request_id, prompt_ids=state.context_ids(), sampling_params=sp)
        merge_weight_versions(versions, out.extra_fields or {})
        ids = list(out.token_ids)[:budget]
        if out.log_probs is None:
            raise RuntimeError("the rollout server returned no log-probs: set actor_rollout_ref.rollout.calculate_log_probs=True")
        lps = list(out.log_probs)[: len(ids)]
        if len(out.token_ids) >= budget:
            finish = "length"
        elif ids and ids[-1] == eos:
            finish = "eos"
        else:
            finish = "stop"
        text = agent.tokenizer.decode(ids, skip_special_tokens=False)
        code = state.add_model_turn(ids, lps, finish, text)
        if code is None:
            continue
        results, _ = await loop.run_in_executor(
            None, execute_with_retry, [agent.template.code_prelude + code], agent.run_batch
        )
        state.add_tool_result(results[0], agent.template, agent._encode, agent._encode_plain)
    if state.live:
        state.finish_reason = "max_turns"
    return versions
