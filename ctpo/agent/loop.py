"""Batched multi-turn TIR rollouts on any `Generator` (the CPU toy, evaluation, vLLM).

Each round generates the next turn of every live episode in one `generate` call, then runs all their
code blocks in one sandbox batch (infra failures retried). The turn rule is `ctpo.agent.turns`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ctpo.agent.generation import Generator, SamplingParams
from ctpo.agent.template import load_template, render_prompt
from ctpo.agent.turns import EpisodeState, execute_with_retry


@dataclass
class Episode:
    """One trajectory. `response_*` are aligned per response token (model and observation tokens).

    response_mask: 1 = model token (trained on), 0 = observation token. response_logprobs: behaviour
    log-probs of model tokens, 0.0 at observation tokens. finish_reason: "answer" | "max_turns" |
    "max_tokens" | "eos" | "void" (SimpleTIR void turn; the trainer masks the trajectory) | "infra"
    (sandbox infrastructure failure that persisted after retries: exclude, never score as wrong)."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_mask: list[int]
    turns: int
    tool_calls: int
    tool_statuses: list[str]
    infra_failures: int
    finish_reason: str
    response_text: str  # decoded response (model + observation tokens), what the model saw
    graded_text: str  # what the reward reads: the model's text and its programs' output, no harness text

    @classmethod
    def from_state(cls, state: EpisodeState, tokenizer) -> "Episode":
        return cls(
            prompt_ids=list(state.prompt_ids),
            response_ids=list(state.response_ids),
            response_logprobs=list(state.response_logprobs),
            response_mask=list(state.response_mask),
            turns=state.turns,
            tool_calls=state.tool_calls,
            tool_statuses=list(state.tool_statuses),
            infra_failures=state.infra_failures,
            finish_reason=state.finish_reason,
            response_text=tokenizer.decode(state.response_ids),
            graded_text=tokenizer.decode(state.graded_ids()),
        )


def sandbox_runner(cfg, sandbox=None):
    """A `list[str] -> list[ExecResult]` callable: `sandbox.run_many` (a `ctpo.sandbox.SandboxPool`,
    which carries its own timeout, or a test double) or `ctpo.sandbox.run_many` with the rollout's
    concurrency and timeout."""
    if sandbox is not None:
        return sandbox.run_many
    from ctpo.sandbox import SandboxLimits, run_many

    limits = SandboxLimits(timeout_s=cfg.sandbox_timeout_s)
    return lambda codes: run_many(codes, cfg.sandbox_concurrency, limits)


def encode_prompts(tokenizer, questions: list[str], cfg) -> list[list[int]]:
    """Render and encode each question; a prompt over `max_prompt_tokens` is an error (never truncated)."""
    prompts = []
    for i, q in enumerate(questions):
        ids = tokenizer.encode(render_prompt(q, cfg.template, enable_thinking=cfg.enable_thinking))
        if len(ids) > cfg.max_prompt_tokens:
            raise ValueError(
                f"question {i}: prompt has {len(ids)} tokens, over rollout.max_prompt_tokens={cfg.max_prompt_tokens}"
            )
        prompts.append(ids)
    return prompts


def run_episodes(
    generator: Generator,
    tokenizer,
    questions: list[str],
    cfg,
    params: SamplingParams,
    sandbox=None,
) -> list[Episode]:
    """One episode per question (repeat a question n times for a group). cfg: RolloutConfig.

    params.max_new_tokens is overridden per round by the largest remaining response budget; each
    episode's turn is then cut to its own budget (a prefix of a sample is still exactly sampled)."""
    template = load_template(cfg.template)
    run_batch = sandbox_runner(cfg, sandbox)
    states = [EpisodeState.from_rollout_config(p, cfg) for p in encode_prompts(tokenizer, questions, cfg)]
    stop = list(template.stop)
    for rnd in range(cfg.max_turns):
        live = [s for s in states if s.live]
        if not live:
            break
        budget = max(s.remaining for s in live)
        round_params = replace(
            params, max_new_tokens=budget, seed=None if params.seed is None else params.seed + 1000003 * rnd
        )
        outs = generator.generate([s.context_ids() for s in live], round_params, stop)
        if len(outs) != len(live):
            raise RuntimeError(f"generator returned {len(outs)} outputs for {len(live)} prompts")
        to_run: list[EpisodeState] = []
        for s, o in zip(live, outs):
            ids = o.token_ids[: s.remaining]
            finish = o.finish_reason if len(ids) == len(o.token_ids) else "length"
            if s.add_model_turn(ids, o.log_probs[: len(ids)], finish, tokenizer.decode(ids)) is not None:
                to_run.append(s)
        if to_run:
            codes = [template.code_prelude + s.pending_code for s in to_run]
            results, _ = execute_with_retry(codes, run_batch)
            for s, r in zip(to_run, results):
                s.add_tool_result(r, template, tokenizer.encode, tokenizer.encode_plain)
    for s in states:  # every turn was used (the last one ran code)
        if s.live:
            s.finish_reason = "max_turns"
    return [Episode.from_state(s, tokenizer) for s in states]
