"""run_episodes with a scripted Generator double (multi-turn behaviour chosen by the test) and the real
sandbox: ids the trainer sees == ids generated, masks, max_turns, token budget, void turns, infra retries."""
import pytest

from ctpo.agent import GenOutput, SamplingParams, run_episodes
from ctpo.config import RolloutConfig
from ctpo.sandbox import ExecResult
from ctpo.tokenizer import CharTokenizer

TOK = CharTokenizer()
EOS = "<|im_end|>"


class ScriptedGenerator:
    """Emits, for each episode (found by its question inside the prompt), the next scripted turn, honouring
    stop strings and max_new_tokens like a real generator. Records every emitted id and log-prob."""

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = scripts
        self.turn = {q: 0 for q in scripts}
        self.emitted = {q: [] for q in scripts}  # per question: list of (ids, logprobs) per turn
        self.calls = []

    def generate(self, prompts, params, stop):
        self.calls.append(len(prompts))
        outs = []
        for p in prompts:
            text = TOK.decode(p)
            q = next(q for q in self.scripts if f"user\n{q}<|im_end|>" in text or f"user\n{q}\n" in text)
            turn_text = self.scripts[q][self.turn[q]]
            self.turn[q] += 1
            ids = TOK.encode(turn_text)  # char ids; "<|im_end|>" is one id
            reason = "length"
            for k in range(1, len(ids) + 1):
                if ids[k - 1] == TOK.eos_token_id:
                    ids, reason = ids[:k], "eos"
                    break
                if any(s in TOK.decode(ids[:k]) for s in stop):
                    ids, reason = ids[:k], "stop"
                    break
            if len(ids) > params.max_new_tokens:
                ids, reason = ids[: params.max_new_tokens], "length"
            lps = [-0.001 * (len(self.emitted[q]) + 1) * (j + 1) for j in range(len(ids))]
            self.emitted[q].append((ids, lps))
            outs.append(GenOutput(ids, lps, reason))
        return outs


def cfg(**kw):
    base = dict(n=1, max_turns=4, max_prompt_tokens=128, max_response_tokens=400, max_obs_tokens=40,
                obs_max_chars=512, template="toy_tir", sandbox_timeout_s=30.0, sandbox_concurrency=2)
    base.update(kw)
    return RolloutConfig(**base)


def obs_ids(output: str, max_obs_tokens: int = 40) -> list[int]:
    return TOK.encode(f"\nCode execution result: {output}\n")[:max_obs_tokens]


def test_multi_turn_ids_masks_and_logprobs_are_exactly_the_rollouts():
    scripts = {
        "Q1": ["Try.\n```python\nprint(6*7)\n```\nignored tail", "So \\boxed{42}." + EOS],
        "Q2": ["```python\nprint(1/0)\n```\n", "Fix:\n```python\nprint(2+2)\n```\n", "\\boxed{4}" + EOS],
        "Q3": ["\\boxed{7}" + EOS],
    }
    gen = ScriptedGenerator(scripts)
    eps = run_episodes(gen, TOK, list(scripts), cfg(), SamplingParams(seed=0))
    assert gen.calls == [3, 2, 1]  # one batched generate per round over the live episodes
    expected_obs = {"Q1": [obs_ids("42\n")],
                    "Q2": [obs_ids("ZeroDivisionError: division by zero"), obs_ids("4\n")], "Q3": []}
    for q, ep in zip(scripts, eps):
        ids, mask, lps = [], [], []
        turns = gen.emitted[q]
        for t, (tids, tlps) in enumerate(turns):  # interleave model turns and observations by hand
            ids += tids; mask += [1] * len(tids); lps += tlps
            if t < len(expected_obs[q]):
                o = expected_obs[q][t]
                ids += o; mask += [0] * len(o); lps += [0.0] * len(o)
        assert ep.response_ids == ids
        assert ep.response_mask == mask
        assert ep.response_logprobs == lps
        assert ep.finish_reason == "answer"
        assert ep.turns == len(turns) and ep.tool_calls == len(expected_obs[q])
    assert eps[1].tool_statuses == ["error", "ok"]
    assert "ignored tail" not in eps[0].response_text  # generation stopped at the closing fence


def test_model_tokens_are_never_reencoded():
    # the model spells "<think>" one character at a time; decode+encode would merge it into one id
    spelled = [TOK.encode(c)[0] for c in "<think>"]
    assert TOK.encode(TOK.decode(spelled)) != spelled

    class Spelling(ScriptedGenerator):
        def generate(self, prompts, params, stop):
            return [GenOutput(spelled + [TOK.eos_token_id], [-0.5] * 8, "eos") for _ in prompts]

    ep = run_episodes(Spelling({"Q": []}), TOK, ["Q"], cfg(), SamplingParams())[0]
    assert ep.response_ids == spelled + [TOK.eos_token_id]
    assert ep.finish_reason == "eos"


def test_max_turns_stops_without_running_the_last_code():
    code = "```python\nprint(1)\n```\n"
    gen = ScriptedGenerator({"Q": [code] * 5})
    ep = run_episodes(gen, TOK, ["Q"], cfg(max_turns=2), SamplingParams())[0]
    assert ep.finish_reason == "max_turns" and ep.turns == 2 and ep.tool_calls == 1
    assert ep.response_mask[-1] == 1  # ends on the model's turn, not an observation


def test_token_budget_counts_observations_and_stops():
    code = "```python\nprint('x' * 300)\n```\n"
    gen = ScriptedGenerator({"Q": [code, code, code]})
    ep = run_episodes(gen, TOK, ["Q"], cfg(max_response_tokens=70, max_obs_tokens=30), SamplingParams())[0]
    assert len(ep.response_ids) == 70 and ep.finish_reason == "max_tokens"
    n_model = len(TOK.encode(code))
    assert ep.response_mask == [1] * n_model + [0] * 30 + [1] * (70 - n_model - 30)


def test_void_turn_option():
    scripts = {"Q": ["I am not sure." + EOS]}
    ep = run_episodes(ScriptedGenerator(scripts), TOK, ["Q"], cfg(void_turn_masking=True), SamplingParams())[0]
    assert ep.finish_reason == "void"
    ep = run_episodes(ScriptedGenerator(scripts), TOK, ["Q"], cfg(void_turn_masking=False), SamplingParams())[0]
    assert ep.finish_reason == "eos"


class FlakySandbox:
    """Test double: the first `fail_first` runs of every program fail with status infra."""

    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.runs = {}

    def run_many(self, codes):
        out = []
        for c in codes:
            self.runs[c] = self.runs.get(c, 0) + 1
            if self.runs[c] <= self.fail_first:
                out.append(ExecResult("", "sandbox crashed", None, False, False, 0.0, "infra", "setup failed"))
            else:
                out.append(ExecResult("5\n", "", 0, False, False, 0.0, "ok"))
        return out


@pytest.mark.parametrize("fail_first,finish,infra", [(2, "answer", 0), (3, "infra", 1)])
def test_infra_failures_are_retried_then_counted_never_shown(fail_first, finish, infra):
    scripts = {"Q": ["```python\nprint(5)\n```\n", "\\boxed{5}" + EOS]}
    sandbox = FlakySandbox(fail_first)
    ep = run_episodes(ScriptedGenerator(scripts), TOK, ["Q"], cfg(), SamplingParams(), sandbox=sandbox)[0]
    assert sum(sandbox.runs.values()) == min(fail_first + 1, 3)  # 1 try + up to 2 retries
    assert ep.finish_reason == finish and ep.infra_failures == infra
    assert "crashed" not in ep.response_text and "setup failed" not in ep.response_text
    if infra:
        assert ep.tool_statuses == ["infra"] and 0 not in ep.response_mask  # no observation appended


def test_overlong_prompt_is_an_error():
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        run_episodes(ScriptedGenerator({"Q" * 200: []}), TOK, ["Q" * 200], cfg(), SamplingParams())


def test_final_answer_printed_by_the_code_ends_the_episode():
    # qwen3_tir prepends SimpleTIR's final_answer helper; its printed \boxed{} ends the episode
    scripts = {"Q": ["```python\nfinal_answer(6*7)\n```\n", "never generated"]}
    gen = ScriptedGenerator(scripts)
    ep = run_episodes(gen, TOK, ["Q"], cfg(template="qwen3_tir", max_prompt_tokens=2000), SamplingParams())[0]
    assert ep.finish_reason == "answer" and ep.turns == 1 and gen.turn["Q"] == 1
    assert ep.response_text.endswith("\nCode execution result: \\boxed{42}\n\n")
