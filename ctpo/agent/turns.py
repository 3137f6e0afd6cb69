"""The TIR turn logic, shared by the CPU loop (`ctpo.agent.loop`) and the verl agent loop / tool.

Protocol (SimpleTIR-style, written down once here):

- A model turn is the tokens generated until a stop string (the closing fence of a code block),
  `<|im_end|>`, or the response budget. Its ids and log-probs are kept exactly as generated: model
  tokens are never decoded and re-encoded (trl#5224, verl#6501). Text is decoded only to decide.
- Decision after a model turn, in order:
  1. the turn holds `\\boxed{` outside its code     -> finish "answer" (its code, if any, is not run)
  2. it holds a complete code block (`CODE_BLOCK_RE`, the first block, as SimpleTIR extracts it)
       -> on the last allowed turn: finish "max_turns"; otherwise run the code
  3. the generation hit the token budget             -> finish "max_tokens"
  4. neither code nor answer                         -> finish "void" when `void_turn_masking`
                                                        (the trainer masks the trajectory), else "eos"
- After a run: the observation `template.observation` with the tool output (stdout, or the last
  stderr line on errors) truncated to `obs_max_chars` (head and tail halves kept, as SimpleTIR) is
  encoded, cut to `max_obs_tokens` and to the remaining budget, and appended with mask 0. The output is
  encoded as plain text (`encode_plain`): a printed `<|im_end|>` stays characters, never a control
  token. If the program printed `\\boxed{` (e.g. through the prelude's `final_answer`), finish "answer".
- What the reward reads (`graded_ids`): the model's tokens and what its programs printed, never the
  template's text or harness text (the truncation marker, status messages): a `\\boxed{` cut by the
  truncation cannot take the marker's `512` as its answer.
- Sandbox infrastructure failures (status "infra") are retried up to `INFRA_RETRIES` times; one that
  persists is never shown to the model: the episode ends with finish "infra" and `infra_failures`
  counts it, so it is excluded rather than scored as a wrong answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ctpo.agent.template import TIRTemplate

CODE_BLOCK_RE = re.compile(r"```(?:py|python)?\n(.*?)\n```", re.DOTALL)
ANSWER_MARK = "\\boxed{"
INFRA_RETRIES = 2
STATUSES = ("ok", "error", "timeout", "memory", "infra")
FINISH_REASONS = ("answer", "max_turns", "max_tokens", "eos", "void", "infra")


def extract_code(text: str) -> str | None:
    """The first complete ```python / ```py / ``` block's body (stripped), or None."""
    m = CODE_BLOCK_RE.search(text)
    return m.group(1).strip() if m else None


def has_answer(text: str) -> bool:
    """`\\boxed{` written by the model, code block bodies excluded (a block that prints a boxed value
    is run; its printed answer then ends the episode)."""
    return ANSWER_MARK in CODE_BLOCK_RE.sub("", text)


def truncation_marker(max_chars: int) -> str:
    return f"\n...[output truncated to {max_chars} characters]...\n"


def truncate_pieces(text: str, max_chars: int) -> list[tuple[str, bool]]:
    """SimpleTIR's rule as (text, is_the_program's) pieces: the whole text, or its first and last
    `max_chars // 2` characters with the (harness) marker between."""
    if len(text) <= max_chars:
        return [(text, True)]
    half = max_chars // 2
    return [(text[:half], True), (truncation_marker(max_chars), False), (text[len(text) - half :], True)]


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the first and last `max_chars // 2` characters with a marker between (SimpleTIR's rule)."""
    return "".join(t for t, _ in truncate_pieces(text, max_chars))


def tool_output(result) -> tuple[str, bool]:
    """What the model sees of an ExecResult and whether the program wrote it: stdout, or on failure the
    last stderr line (SimpleTIR shows one error line); else a short status message (harness text)."""
    if result.status == "ok":
        return result.stdout, True
    lines = [ln for ln in (result.stderr or "").splitlines() if ln.strip()]
    if lines:
        return lines[-1], True
    if result.status == "timeout":
        return "TimeoutError: execution time limit exceeded", False
    if result.status == "memory":
        return "MemoryError: memory limit exceeded", False
    return f"Error: exit code {result.exit_code}", False


def tool_output_text(result) -> str:
    return tool_output(result)[0]


def observation_pieces(result, template: TIRTemplate, obs_max_chars: int) -> list[tuple[str, bool]]:
    """The observation as (text, printed_by_the_program) pieces: the template's text around `{output}`,
    the output (head and tail when truncated), harness text (the truncation marker, status messages)."""
    head, _, tail = template.observation.partition("{output}")
    out, by_program = tool_output(result)
    pieces = [(t, by_program and own) for t, own in truncate_pieces(out, obs_max_chars)]
    return [(head, False), *pieces, (tail, False)]


def format_observation(result, template: TIRTemplate, obs_max_chars: int) -> str:
    return "".join(t for t, _ in observation_pieces(result, template, obs_max_chars))


def execute_with_retry(codes: Sequence[str], run_batch: Callable[[list[str]], list], retries: int = INFRA_RETRIES):
    """Run `codes` with `run_batch`; re-run those whose status is "infra" up to `retries` more times.

    Returns (results, attempts): the final ExecResult per code and how many runs each took."""
    results = list(run_batch(list(codes)))
    if len(results) != len(codes):
        raise RuntimeError(f"sandbox returned {len(results)} results for {len(codes)} programs")
    attempts = [1] * len(codes)
    for _ in range(retries):
        todo = [i for i, r in enumerate(results) if r.status == "infra"]
        if not todo:
            break
        for i, r in zip(todo, run_batch([codes[i] for i in todo])):
            results[i] = r
            attempts[i] += 1
    return results, attempts


@dataclass
class EpisodeState:
    """One trajectory being built. `response_*` lists are aligned: one entry per response token."""

    prompt_ids: list[int]
    max_turns: int
    max_response_tokens: int
    max_obs_tokens: int
    obs_max_chars: int
    void_turn_masking: bool
    response_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    # 1 where the reward may read the token: the model's own, and what its programs printed; 0 for the
    # observation's template text and harness text (truncation marker, status messages)
    response_graded: list[int] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_statuses: list[str] = field(default_factory=list)
    infra_failures: int = 0
    finish_reason: str | None = None  # None while live
    pending_code: str | None = None

    @classmethod
    def from_rollout_config(cls, prompt_ids: list[int], cfg) -> "EpisodeState":
        return cls(
            prompt_ids=list(prompt_ids),
            max_turns=cfg.max_turns,
            max_response_tokens=cfg.max_response_tokens,
            max_obs_tokens=cfg.max_obs_tokens,
            obs_max_chars=cfg.obs_max_chars,
            void_turn_masking=cfg.void_turn_masking,
        )

    @property
    def live(self) -> bool:
        return self.finish_reason is None

    @property
    def remaining(self) -> int:
        return self.max_response_tokens - len(self.response_ids)

    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_model_turn(self, token_ids: list[int], logprobs: list[float], gen_finish: str, text: str) -> str | None:
        """Append a generated turn (ids/log-probs exactly as sampled, cut to the budget) and decide.

        `text` is the decoded turn, used only for the decision. Returns the code to run, or None when
        the episode finished (see the module docstring for the rule)."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"generator returned {len(token_ids)} ids but {len(logprobs)} log-probs")
        if len(token_ids) > self.remaining:
            token_ids, logprobs, gen_finish = token_ids[: self.remaining], logprobs[: self.remaining], "length"
        self.response_ids += list(token_ids)
        self.response_logprobs += [float(x) for x in logprobs]
        self.response_mask += [1] * len(token_ids)
        self.response_graded += [1] * len(token_ids)
        self.turns += 1
        code = extract_code(text)
        if has_answer(text):
            self.finish_reason = "answer"
        elif code is not None:
            if self.turns >= self.max_turns:
                self.finish_reason = "max_turns"
            elif self.remaining <= 0:
                self.finish_reason = "max_tokens"
            else:
                self.pending_code = code
                return code
        elif gen_finish == "length" or self.remaining <= 0:
            self.finish_reason = "max_tokens"
        else:
            self.finish_reason = "void" if self.void_turn_masking else "eos"
        return None

    def graded_ids(self) -> list[int]:
        """The response ids the reward reads (`response_graded`): no template or harness text."""
        return [t for t, g in zip(self.response_ids, self.response_graded) if g]

    def add_tool_result(self, result, template: TIRTemplate, encode: Callable[[str], list[int]],
                        encode_plain: Callable[[str], list[int]]) -> None:
        """Append the observation for the pending code's final (post-retry) ExecResult.

        encode: the template's text (its chat-control strings are special tokens); encode_plain: the
        output and harness text, never a special token (`ctpo.tokenizer`: printed `<|im_end|>` stays text)."""
        if self.pending_code is None:
            raise RuntimeError("add_tool_result called without a pending code block")
        self.pending_code = None
        if result.status not in STATUSES:
            raise ValueError(f"sandbox status must be one of {STATUSES}, got '{result.status}'")
        self.tool_calls += 1
        self.tool_statuses.append(result.status)
        if result.status == "infra":  # persisted after retries: never shown to the model
            self.infra_failures += 1
            self.finish_reason = "infra"
            return
        obs_ids: list[int] = []
        graded: list[int] = []
        pieces = observation_pieces(result, template, self.obs_max_chars)
        for i, (text, by_program) in enumerate(pieces):  # first and last: the template's own text
            ids = list((encode if i in (0, len(pieces) - 1) else encode_plain)(text)) if text else []
            obs_ids += ids
            graded += [int(by_program)] * len(ids)
        keep = min(self.max_obs_tokens, self.remaining)
        obs_ids = obs_ids[:keep]
        self.response_ids += obs_ids
        self.response_logprobs += [0.0] * len(obs_ids)
        self.response_mask += [0] * len(obs_ids)
        self.response_graded += graded[:keep]
        if result.status == "ok" and ANSWER_MARK in result.stdout:
            self.finish_reason = "answer"
        elif self.remaining <= 0:
            self.finish_reason = "max_tokens"
