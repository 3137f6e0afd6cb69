"""Evaluation episodes under the release protocol, through the training loop's own class.

Each episode is a `ReleaseToolAgentLoop` (verl's ToolAgentLoop + the release's system prompt), so the
messages, the chat-template rendering (verl's Continuous Token builder), the tool-call parsing and the
`tool` messages are those of training by construction. Only the LLM server is replaced: `RoundBatcher`
collects the loops' generate requests and, once every live episode waits, runs them as one batch on a
`ctpo.agent.Generator` (vLLM on GPU, transformers on CPU), in episode order, with the round's seed, so
results do not depend on timing. Per-turn token limits follow verl's vLLM server:
min(response_length, prompt_length + response_length - len(context)), and the response is cut to
response_length at the end (as verl does).

    episodes = run_release_episodes(generator, hf_tokenizer, questions, cfg.rollout, params, tool,
                                    hf_model_type="qwen3")
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.workers.rollout.replica import TokenOutput

from ctpo.agent.generation import Generator, SamplingParams
from ctpo.agent.loop import Episode
from ctpo.agent.protocols import RELEASE_MAX_PARALLEL_CALLS, RELEASE_PARSER, RELEASE_TRUNCATE_SIDE, release_system_prompt
from ctpo.agent.release_protocol import ReleaseToolAgentLoop, strip_harness
from ctpo.agent.turns import ANSWER_MARK

ROUND_SEED_STRIDE = 1000003  # as ctpo.agent.loop.run_episodes


def trainer_config(cfg) -> OmegaConf:
    """The slice of verl's trainer config a ToolAgentLoop reads, from a RolloutConfig (the values
    `ctpo.train.verl_backend` passes to verl for the same run)."""
    return OmegaConf.create({"actor_rollout_ref": {"rollout": {
        "prompt_length": cfg.max_prompt_tokens,
        "response_length": cfg.max_response_tokens,
        "full_determinism": False,
        "multi_turn": {
            "max_user_turns": cfg.max_turns,
            "max_assistant_turns": cfg.max_turns,
            "max_parallel_calls": RELEASE_MAX_PARALLEL_CALLS,
            "max_tool_response_length": cfg.max_obs_tokens,
            "tool_response_truncate_side": RELEASE_TRUNCATE_SIDE,
            "format": RELEASE_PARSER,
        },
    }}})


class RoundBatcher:
    """verl's `server_manager.generate` for n episodes, answered in synchronous rounds on a Generator."""

    def __init__(self, generator: Generator, params: SamplingParams, n: int, prompt_length: int, response_length: int):
        self.generator, self.params = generator, params
        self.prompt_length, self.response_length = prompt_length, response_length
        self.live = set(range(n))
        self.pending: dict[int, tuple[list[int], asyncio.Future]] = {}
        self.turns = [0] * n  # generate calls per episode = assistant turns
        self.round = 0

    def client(self, index: int) -> "_Client":
        return _Client(self, index)

    def done(self, index: int) -> None:
        self.live.discard(index)
        self._maybe_flush()

    async def request(self, index: int, prompt_ids: list[int]) -> TokenOutput:
        fut = asyncio.get_running_loop().create_future()
        self.pending[index] = (list(prompt_ids), fut)
        self.turns[index] += 1
        self._maybe_flush()
        return await fut

    def budget(self, context_len: int) -> int:
        """verl's vLLM server default max_tokens, at least 1 (its lower clamp)."""
        return max(1, min(self.response_length, self.prompt_length + self.response_length - context_len))

    def _maybe_flush(self) -> None:
        if not self.pending or set(self.pending) != self.live:
            return
        batch = sorted(self.pending.items())
        self.pending = {}
        budgets = [self.budget(len(p)) for _, (p, _) in batch]
        seed = None if self.params.seed is None else self.params.seed + ROUND_SEED_STRIDE * self.round
        params = replace(self.params, max_new_tokens=max(budgets), seed=seed)
        self.round += 1
        try:  # every live episode waits on this batch, so running it inline blocks nobody
            outs = self.generator.generate([p for _, (p, _) in batch], params, [])
            if len(outs) != len(batch):
                raise RuntimeError(f"generator returned {len(outs)} outputs for {len(batch)} prompts")
        except Exception as e:
            for _, (_, fut) in batch:
                fut.set_exception(e)
            return
        for (_, (_, fut)), o, b in zip(batch, outs, budgets):
            ids = list(o.token_ids)[:b]  # a prefix of a sample is still exactly sampled
            fut.set_result(TokenOutput(token_ids=ids, log_probs=list(o.log_probs)[: len(ids)], stop_reason="completed"))


class _Client:
    def __init__(self, batcher: RoundBatcher, index: int) -> None:
        self.batcher, self.index = batcher, index

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        return await self.batcher.request(self.index, prompt_ids)


def finish_reason(out, turns: int, max_turns: int, response_length: int, text: str) -> str:
    ef = out.extra_fields
    if ef.get("infra_failures"):
        return "infra"
    if len(out.response_ids) >= response_length:
        return "max_tokens"
    if ANSWER_MARK in text:
        return "answer"
    return "max_turns" if turns >= max_turns else "eos"


def run_release_episodes(
    generator: Generator,
    tokenizer,
    questions: list[str],
    cfg,
    params: SamplingParams,
    tool,
    *,
    hf_model_type: str | None,
    system_prompt: str | None = None,
) -> list[Episode]:
    """One episode per question through `ReleaseToolAgentLoop`. tokenizer: a transformers tokenizer with
    the model's chat template (or `ctpo.tokenizer.HFTokenizer`); cfg: RolloutConfig; tool: a
    `CodeInterpreterTool`; hf_model_type: the checkpoint's config.json `model_type` (selects verl's
    Continuous Token builder, e.g. "qwen3"). A prompt over `max_prompt_tokens` is an error."""
    hf_tok = getattr(tokenizer, "hf", tokenizer)
    prompt = system_prompt if system_prompt is not None else release_system_prompt()
    return asyncio.run(_run(generator, hf_tok, list(questions), cfg, params, tool, hf_model_type, prompt))


async def _run(generator, hf_tok, questions, cfg, params, tool, hf_model_type, system_prompt) -> list[Episode]:
    tc = DictConfigWrap(trainer_config(cfg))
    data = DictConfigWrap(OmegaConf.create({"apply_chat_template_kwargs": {"enable_thinking": cfg.enable_thinking}}))
    batcher = RoundBatcher(generator, params, len(questions), cfg.max_prompt_tokens, cfg.max_response_tokens)
    loops = [
        ReleaseToolAgentLoop(
            trainer_config=tc, server_manager=batcher.client(i), tokenizer=hf_tok, processor=None,
            dataset_cls=None, data_config=data, hf_model_type=hf_model_type, tools=ToolListWrap([tool]),
            system_prompt=system_prompt,
        )
        for i in range(len(questions))
    ]
    messages = [[{"role": "user", "content": q}] for q in questions]
    if loops:  # overlong prompts are errors (verl filters them from the data), never left-truncated
        from ctpo.agent.release_protocol import with_system_prompt

        for i, m in enumerate(messages):
            n = len(loops[0].continuous_token_builder.build_initial_tokens(
                with_system_prompt(m, system_prompt), tools=loops[0].tool_schemas))
            if n > cfg.max_prompt_tokens:
                raise ValueError(f"question {i}: prompt has {n} tokens, over rollout.max_prompt_tokens={cfg.max_prompt_tokens}")

    async def one(i: int):
        try:
            return await loops[i].run({}, raw_prompt=messages[i])
        finally:
            batcher.done(i)

    outs = await asyncio.gather(*(one(i) for i in range(len(questions))))
    episodes = []
    for i, out in enumerate(outs):
        text = hf_tok.decode(out.response_ids, skip_special_tokens=True)
        ef = out.extra_fields
        lps = out.response_logprobs if out.response_logprobs is not None else [0.0] * len(out.response_ids)
        episodes.append(Episode(
            prompt_ids=list(out.prompt_ids), response_ids=list(out.response_ids), response_logprobs=list(lps),
            response_mask=list(out.response_mask), turns=batcher.turns[i], tool_calls=int(ef.get("tool_calls", 0)),
            tool_statuses=list(ef.get("tool_statuses", [])), infra_failures=int(ef.get("infra_failures", 0)),
            finish_reason=finish_reason(out, batcher.turns[i], cfg.max_turns, cfg.max_response_tokens, text),
            response_text=text, graded_text=strip_harness(text),
        ))
    return episodes



def checkpoint_model_type(checkpoint) -> str | None:
    """`model_type` of a checkpoint's config.json (local dir or hub id in the local cache); None if unknown."""
    import json
    from pathlib import Path

    f = Path(checkpoint) / "config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(checkpoint)).model_type
    except (OSError, ValueError):
        return None


def release_rollout(generator: Generator, tokenizer, cfg, sandbox, checkpoint):
    """`(questions, params) -> [Episode]` for ctpo.eval: the release tool (configs/verl/release_tool_config.yaml)
    on `sandbox` (a SandboxPool), the checkpoint's model type, the release's system prompt."""
    from verl.tools.schemas import OpenAIFunctionToolSchema

    from ctpo.agent.release_protocol import CodeInterpreterTool, load_tool_config

    tool_cfg, schema = load_tool_config()
    tool = CodeInterpreterTool(tool_cfg, OpenAIFunctionToolSchema.model_validate(schema), sandbox=sandbox)
    model_type, prompt = checkpoint_model_type(checkpoint), release_system_prompt()

    def run(questions: list[str], params: SamplingParams) -> list[Episode]:
        return run_release_episodes(generator, tokenizer, questions, cfg, params, tool, hf_model_type=model_type,
                                    system_prompt=prompt)

    return run


__all__ = ["RoundBatcher", "checkpoint_model_type", "release_rollout", "run_release_episodes", "trainer_config"]
