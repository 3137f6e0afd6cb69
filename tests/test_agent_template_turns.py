"""TIR chat template (configs/tir) and the shared turn rule (ctpo.agent.turns)."""
import hashlib
import json

import pytest
from omegaconf import OmegaConf

from ctpo.agent.template import TIR_DIR, load_template, render_prompt, template_hash
from ctpo.agent.turns import EpisodeState, execute_with_retry, extract_code, format_observation, truncate_middle
from ctpo.config import ConfigError, RolloutConfig
from ctpo.sandbox import ExecResult


def _res(status="ok", stdout="", stderr="", exit_code=0):
    return ExecResult(stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=status == "timeout",
                      truncated=False, wall_s=0.0, status=status)


def test_qwen3_prompt_has_chat_tokens_and_empty_think_block():
    text = render_prompt("What is $\\frac{1}{2}+{x}$?", "qwen3_tir")
    sys_prompt = load_template("qwen3_tir").system_prompt
    assert text.startswith("<|im_start|>system\n" + sys_prompt + "<|im_end|>\n<|im_start|>user\nWhat is $\\frac{1}{2}+{x}$?")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "```python" in sys_prompt and "\\boxed{}" in sys_prompt
    assert render_prompt("q", "qwen3_tir", enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_toy_prompt_is_short():
    from ctpo.tokenizer import CharTokenizer

    question = "Compute 12*34."
    ids = CharTokenizer().encode(render_prompt(question, "toy_tir"))
    assert len(ids) - len(question) <= 80  # fixed overhead; configs/experiments/toy.yaml allows 128 prompt tokens


def test_template_hash_is_sha256_of_the_file_content():
    data = OmegaConf.to_container(OmegaConf.load(TIR_DIR / "toy_tir.yaml"))
    expect = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert template_hash("toy_tir") == expect
    assert template_hash("toy_tir") != template_hash("qwen3_tir")


def test_unknown_template_and_bad_keys_raise(tmp_path):
    with pytest.raises(ConfigError, match="no such TIR template 'nope'"):
        load_template("nope")
    (tmp_path / "bad.yaml").write_text((TIR_DIR / "toy_tir.yaml").read_text() + "extra_key: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_template("bad", tmp_path)


@pytest.mark.parametrize("text,code", [
    ("Let me compute.\n```python\nprint(1+1)\n```\n", "print(1+1)"),
    ("```py\nx = 2\nprint(x)\n```", "x = 2\nprint(x)"),
    ("```\nprint(3)\n```\nmore ```python\nprint(4)\n```", "print(3)"),  # the first block (SimpleTIR)
    ("```python\nprint(1)", None),  # unclosed
    ("no code", None),
])
def test_extract_code_follows_simpletir_rule(text, code):
    assert extract_code(text) == code


def test_truncate_middle_keeps_head_and_tail():
    s = "".join(chr(ord("a") + i % 26) for i in range(2000))
    t = truncate_middle(s, 512)
    assert t.startswith(s[:256]) and t.endswith(s[-256:]) and "truncated" in t
    assert truncate_middle("short", 512) == "short"


def test_observation_shows_stdout_or_last_error_line():
    tpl = load_template("toy_tir")
    assert format_observation(_res(stdout="42\n"), tpl, 512) == "\nCode execution result: 42\n\n"
    err = _res("error", stderr="Traceback...\n  File x\nZeroDivisionError: division by zero\n", exit_code=1)
    assert format_observation(err, tpl, 512) == "\nCode execution result: ZeroDivisionError: division by zero\n"
    assert "TimeoutError" in format_observation(_res("timeout", exit_code=None), tpl, 512)
    assert "MemoryError" in format_observation(_res("memory", exit_code=None), tpl, 512)


def _state(**kw):
    cfg = RolloutConfig(max_turns=3, max_response_tokens=50, max_obs_tokens=8, obs_max_chars=512, **kw)
    return EpisodeState.from_rollout_config([1, 2, 3], cfg)


def test_state_decisions():
    s = _state()
    assert s.add_model_turn([5, 6], [-0.1, -0.2], "stop", "```python\nprint(1)\n```\n") == "print(1)"
    s.add_tool_result(_res(stdout="1\n"), load_template("toy_tir"), lambda t: [9] * len(t), lambda t: [8] * len(t))
    assert s.response_mask == [1, 1] + [0] * 8  # observation cut to max_obs_tokens
    assert s.response_logprobs == [-0.1, -0.2] + [0.0] * 8
    assert s.add_model_turn([7], [-0.3], "eos", "\\boxed{1}") is None and s.finish_reason == "answer"
    s = _state()
    s.add_model_turn([5], [-1.0], "eos", "I think so.")
    assert s.finish_reason == "eos"
    s = _state(void_turn_masking=True)
    s.add_model_turn([5], [-1.0], "eos", "I think so.")
    assert s.finish_reason == "void"
    s = _state()
    s.add_model_turn([5] * 60, [-1.0] * 60, "stop", "x" * 60)
    assert s.finish_reason == "max_tokens" and len(s.response_ids) == 50


def test_execute_with_retry_reruns_only_infra_failures():
    calls = []
    script = {"a": ["ok"], "b": ["infra", "infra", "ok"], "c": ["infra", "infra", "infra", "ok"]}

    def run_batch(codes):
        calls.append(list(codes))
        return [_res(script[c].pop(0)) for c in codes]

    results, attempts = execute_with_retry(["a", "b", "c"], run_batch, retries=2)
    assert [r.status for r in results] == ["ok", "ok", "infra"]
    assert attempts == [1, 3, 3]
    assert calls == [["a", "b", "c"], ["b", "c"], ["b", "c"]]


def test_boxed_inside_code_runs_the_code_boxed_outside_answers():
    s = _state()
    code = "```python\nprint('\\\\boxed{%d}' % (6*7))\n```\n"
    assert s.add_model_turn([5], [-0.1], "stop", code) is not None  # boxed only inside the code: run it
    s = _state()
    assert s.add_model_turn([5], [-0.1], "stop", "So \\boxed{4}.\n" + code) is None
    assert s.finish_reason == "answer"
