"""The release's tool protocol on stock verl 0.9.1 (rollout.protocol: release), on CPU.

Training path: verl's real ToolParser registry, ToolAgentLoop (through `ReleaseToolAgentLoop`), Continuous
Token builder and tool registry, driven by a scripted server. Evaluation path: `run_release_episodes` on a
scripted `Generator`; it must produce the training path's tokens exactly. Tokenizer: `qwen3_tokenizer`
(Qwen3's chat template text on an offline byte-level tokenizer, no download)."""
import asyncio
import json

import pytest
from omegaconf import OmegaConf

pytest.importorskip("verl.experimental.agent_loop.tool_agent_loop")

from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry  # noqa: E402
from verl.experimental.agent_loop.tool_parser import ToolParser  # noqa: E402
from verl.tools.schemas import OpenAIFunctionToolSchema  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from ctpo.agent.generation import GenOutput  # noqa: E402
from ctpo.agent.protocols import RELEASE_TOOL_CONFIG, release_system_prompt  # noqa: E402
from ctpo.agent.release_episodes import run_release_episodes, trainer_config  # noqa: E402
from ctpo.agent.release_protocol import (  # noqa: E402
    INFRA_TEXT, CodeInterpreterTool, ReleaseToolAgentLoop, fallback_calls, load_tool_config, parse_timeout,
    release_output_text, with_system_prompt,
)
from ctpo.agent.generation import SamplingParams  # noqa: E402
from ctpo.config import ConfigError, RolloutConfig, load_experiment, load_run_config, resolve_run  # noqa: E402
from ctpo.sandbox import ExecResult  # noqa: E402
from qwen3_tokenizer import qwen3_style_tokenizer  # noqa: E402

TOK = qwen3_style_tokenizer()
# The release's DEFAULT_TOOL_USE_SYSTEM_PROMPT (verl/experimental/agent_loop/tool_agent_loop.py of
# horizon-llm/CTPO at acc4021), copied here independently of configs/verl/agent_loop.yaml.
RELEASE_PROMPT = (
    "Solve the following problem step by step. You can write executable Python code to help your reasoning. "
    "The code will be executed by an external sandbox, and execution output will be returned as observation text "
    "starting with 'Code execution result:'. Use that result in your next step.\n\n"
    "Code format:\n"
    "1) When you want to run code, output exactly one fenced code block.\n"
    "2) Use ```python ... ``` format.\n"
    "3) Write complete code with required imports.\n"
    "4) Use print() for key intermediate values and final computed result.\n\n"
    "Answer format:\n"
    "1) If you are ready to finish, output the final answer in boxed format.\n"
    "2) The final line must be: \\boxed{your_final_answer}\n"
    "3) Do not add extra text after the final \\boxed{...}."
)
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def ok(stdout="", stderr="", status="ok"):
    return ExecResult(stdout=stdout, stderr=stderr, exit_code=0 if status == "ok" else 1, timed_out=status == "timeout",
                      truncated=False, wall_s=0.01, status=status)


class FakeSandbox:
    """`run_many(codes, timeout_s)` double: prints what `outputs` maps the code to; records calls."""

    def __init__(self, outputs=None, status="ok"):
        self.outputs, self.status, self.calls = dict(outputs or {}), status, []

    def run_many(self, codes, timeout_s=None):
        self.calls.append((list(codes), timeout_s))
        return [ok(self.outputs.get(c, ""), status=self.status) for c in codes]


def make_tool(sandbox):
    cfg, schema = load_tool_config()
    return CodeInterpreterTool(cfg, OpenAIFunctionToolSchema.model_validate(schema), sandbox=sandbox)


def enc(text):
    return TOK.encode(text, add_special_tokens=False)


class ScriptedServer:
    """verl's server_manager.generate: replays assistant turns (text, ending in <|im_end|>)."""

    def __init__(self, turns):
        self.turns, self.requests = list(turns), []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.requests.append((list(prompt_ids), dict(sampling_params)))
        ids = enc(self.turns.pop(0))
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def rollout_cfg(**kw):
    base = dict(max_prompt_tokens=4000, max_response_tokens=3000, max_turns=5, max_obs_tokens=256)
    base.update(kw)
    return RolloutConfig(**base)


def run_training_loop(turns, sandbox, question="What is 6*7?", **cfg_kw):
    cfg = rollout_cfg(**cfg_kw)
    server = ScriptedServer(turns)

    async def main():  # verl's loops bind the running event loop at construction
        loop = ReleaseToolAgentLoop(
            trainer_config=DictConfigWrap(trainer_config(cfg)), server_manager=server, tokenizer=TOK,
            processor=None, dataset_cls=None, hf_model_type="qwen3", tools=ToolListWrap([make_tool(sandbox)]),
            data_config=DictConfigWrap(OmegaConf.create({"apply_chat_template_kwargs": {"enable_thinking": False}})),
            system_prompt=release_system_prompt(),
        )
        return await loop.run({"temperature": 1.0, "logprobs": True}, raw_prompt=[{"role": "user", "content": question}])

    return asyncio.run(main()), server


# ----------------------------------------------------------------------------- config and registries


def test_system_prompt_and_tool_config_are_the_releases():
    assert release_system_prompt() == RELEASE_PROMPT
    cfg, schema = load_tool_config()
    assert (cfg["default_timeout_s"], cfg["max_timeout_s"], cfg["max_code_chars"], cfg["max_output_chars"]) == (
        30, 45, 20000, 12000)
    assert schema["function"]["name"] == "code_interpreter"
    assert set(schema["function"]["parameters"]["properties"]) == {"code", "timeout", "language"}
    assert schema["function"]["parameters"]["required"] == ["code"]


def test_registered_in_verls_registries_and_built_by_verls_tool_loader():
    assert _agent_loop_registry["ctpo_release"]["_target_"] == "ctpo.agent.release_protocol.ReleaseToolAgentLoop"
    assert type(ToolParser.get_tool_parser("hermes_fallback", TOK)).__name__ == "HermesFallbackToolParser"
    (tool,) = initialize_tools_from_config(str(RELEASE_TOOL_CONFIG))  # verl's loader, real SandboxPool
    assert isinstance(tool, CodeInterpreterTool) and tool.name == "code_interpreter"
    res, _, metrics = asyncio.run(tool.execute("i", {"code": "print(6*7)"}))
    assert res.text == "42\n" and metrics["status"] == "ok"


def test_protocol_is_a_config_choice():
    paper = load_run_config(resolve_run(load_experiment("configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0))
    toy = load_run_config(resolve_run(load_experiment("configs/experiments/toy.yaml"), "toy_ctpo", 0))
    assert paper.rollout.protocol == "release" and toy.rollout.protocol == "ctpo_tir"
    d = resolve_run(load_experiment("configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0)
    d["rollout"]["protocol"] = "hermes"
    with pytest.raises(ConfigError, match="rollout.protocol must be one of"):
        load_run_config(d)
    t = resolve_run(load_experiment("configs/experiments/toy.yaml"), "toy_ctpo", 0)
    t["rollout"]["protocol"] = "release"
    with pytest.raises(ConfigError, match="needs train.backend 'verl'"):
        load_run_config(t)
    from test_verl_backend import verl_argv

    tir = verl_argv(load_run_config(resolve_run(load_experiment("configs/experiments/toy_verl.yaml"), "toy_ctpo", 0)),
                    "/x/w", init="/x/policy")
    assert "actor_rollout_ref.rollout.agent.default_agent_loop=ctpo_tir" in tir
    assert not any("multi_turn.format" in o for o in tir)  # verl's default hermes; the loop ignores it


# ----------------------------------------------------------------------------- parser


def parse(text):
    parser = ToolParser.get_tool_parser("hermes_fallback", TOK)
    return asyncio.run(parser.extract_tool_calls(enc(text)))


def test_hermes_call_is_parsed_by_verls_parser_nested_braces_included():
    code = "d = {1: {2: 3}}\nprint(d)"
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": code, "timeout": 5}})
    content, calls = parse(f"Let me check.\n<tool_call>\n{call}\n</tool_call><|im_end|>")
    assert [c.name for c in calls] == ["code_interpreter"]
    assert json.loads(calls[0].arguments) == {"code": code, "timeout": 5}
    assert "<tool_call>" not in content


def test_fenced_block_without_tool_call_is_a_code_interpreter_call():
    _, calls = parse("First:\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n<|im_end|>")
    assert [json.loads(c.arguments) for c in calls] == [{"code": "print(1)", "timeout": 30},
                                                         {"code": "print(2)", "timeout": 30}]
    assert {c.name for c in calls} == {"code_interpreter"}
    _, none = parse("The answer is \\boxed{4}.<|im_end|>")
    assert none == []
    _, empty = parse("```python\n\n```<|im_end|>")  # an empty block is no call (the release skips it)
    assert empty == []


def test_raw_json_call_precedes_code_blocks():
    calls = fallback_calls('{"name": "code_interpreter", "arguments": {"code": "print(3)"}}\n```python\nprint(4)\n```')
    assert [json.loads(c.arguments) for c in calls] == [{"code": "print(3)"}]


# ----------------------------------------------------------------------------- tool


def test_tool_arguments_follow_the_release():
    tool = make_tool(FakeSandbox())
    assert tool.prepare({"code": "print(1)"})[:2] == ("print(1)", 30.0)
    assert tool.prepare({"code": "x", "timeout": "100"})[1] == 45.0  # cap 45
    assert tool.prepare({"code": "x", "timeout": 0})[1] == 1.0  # lower clamp 1
    assert tool.prepare({"code": "x", "timeout": "soon"})[1] == 30.0
    assert [parse_timeout(v, 30) for v in (None, "12.9", 1e9, float("inf"))] == [30, 12, 300, 30]
    assert tool.prepare({"code": "x", "language": "bash"}) == (None, 0.0, "sandbox blocked unsupported language: bash")
    assert tool.prepare({"code": "x", "language": " Python "})[0] == "x"
    assert len(tool.prepare({"code": "a" * 25000})[0]) == 20000
    assert tool.prepare({"code": "```python\nprint(5)\n```"})[0] == "print(5)"


def test_tool_output_text_follows_the_release():
    assert release_output_text(ok("1\n", "warn\n"), 12000) == "1\nwarn\n"
    long = "x" * 12005
    assert release_output_text(ok(long), 12000) == "x" * 12000 + "\n...[truncated 5 chars]"
    assert release_output_text(ok("partial", status="timeout"), 12000) == "Timeout\n"
    assert release_output_text(ok("", status="error"), 12000) == "sandbox status: runtime_error"
    assert release_output_text(ok("", "Traceback...\nZeroDivisionError: x\n", "error"), 12000).endswith("x\n")


def test_tool_runs_with_the_call_timeout_and_counts_calls():
    sb = FakeSandbox({"print(2)": "2\n"})
    tool = make_tool(sb)

    class Data:
        extra_fields = {}

    res, _, m = asyncio.run(tool.execute("i", {"code": "print(2)", "timeout": 7}, agent_data=Data))
    assert (res.text, m["status"], sb.calls) == ("2\n", "ok", [(["print(2)"], 7.0)])
    assert Data.extra_fields == {"tool_calls": 1, "tool_statuses": ["ok"]}
    bad = make_tool(FakeSandbox(status="infra"))
    res, _, m = asyncio.run(bad.execute("i", {"code": "print(2)"}, agent_data=Data))
    assert res.text == INFRA_TEXT and m["attempts"] == 3 and Data.extra_fields["infra_failures"] == 1


# ----------------------------------------------------------------------------- the training loop


def expected_prompt(question, tools_json):
    return ("<|im_start|>system\n" + RELEASE_PROMPT + "\n\n# Tools\n\nYou may call one or more functions to assist "
            "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
            "<tools>\n" + tools_json + "\n</tools>\n\nFor each function call, return a json object with function name "
            "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n" + question
            + "<|im_end|>\n" + THINK_OFF)


def test_training_loop_renders_messages_tool_turns_and_masks():
    turn1 = "Compute it.\n```python\nprint(6*7)\n```<|im_end|>"
    turn2 = "So \\boxed{42}.<|im_end|>"
    out, server = run_training_loop([turn1, turn2], FakeSandbox({"print(6*7)": "42\n"}))
    schema = load_tool_config()[1]
    tools_json = json.dumps(OpenAIFunctionToolSchema.model_validate(schema).model_dump(exclude_unset=True, exclude_none=True))
    assert TOK.decode(out.prompt_ids) == expected_prompt("What is 6*7?", tools_json)
    tool_turn = "\n<|im_start|>user\n<tool_response>\n42\n\n</tool_response><|im_end|>\n" + THINK_OFF
    assert TOK.decode(out.response_ids) == turn1 + tool_turn + turn2
    n1, nt, n2 = len(enc(turn1)), len(enc(tool_turn)), len(enc(turn2))
    assert out.response_mask == [1] * n1 + [0] * nt + [1] * n2
    assert out.response_logprobs == [-0.5] * n1 + [0.0] * nt + [-0.5] * n2
    # each turn runs to end of sequence: no stop strings, no per-turn token cap from the loop
    assert all("stop" not in sp and "max_tokens" not in sp for _, sp in server.requests)
    assert server.requests[1][0] == out.prompt_ids + out.response_ids[: n1 + nt]
    assert out.extra_fields["tool_calls"] == 1 and out.num_turns == 4  # user + 2 assistant + 1 tool


def test_tool_output_is_cut_by_verls_max_tool_response_length():
    turn = "```python\nprint('x' * 1000)\n```<|im_end|>"
    out, _ = run_training_loop([turn, "done<|im_end|>"], FakeSandbox({"print('x' * 1000)": "a" * 500 + "b" * 500}))
    text = TOK.decode(out.response_ids)
    assert "<tool_response>\n" + "a" * 128 + "...(truncated)..." + "b" * 128 + "\n</tool_response>" in text


def test_infra_failure_masks_the_trajectory():
    out, _ = run_training_loop(["```python\nprint(1)\n```<|im_end|>", "ok<|im_end|>"], FakeSandbox(status="infra"))
    assert out.extra_fields["infra_failures"] == 1 and set(out.response_mask) == {0}
    assert INFRA_TEXT in TOK.decode(out.response_ids)


def test_system_prompt_rule_of_the_release():
    assert with_system_prompt([{"role": "user", "content": "q"}], "S") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert with_system_prompt([{"role": "system", "content": "E"}], "S")[0]["content"] == "S\n\nE"
    assert with_system_prompt([{"role": "system", "content": "xSx"}], "S")[0]["content"] == "xSx"


# ----------------------------------------------------------------------------- evaluation = training


class ScriptedGenerator:
    """ctpo Generator replaying per-question turns; records each batch (size, seed, max_new_tokens)."""

    def __init__(self, script):
        self.script = {q: list(t) for q, t in script.items()}
        self.batches = []

    def generate(self, prompts, params, stop):
        assert stop == []  # turns run to end of sequence
        self.batches.append((len(prompts), params.seed, params.max_new_tokens))
        outs = []
        for p in prompts:
            q = next(q for q in self.script if q in TOK.decode(p))
            ids = enc(self.script[q].pop(0))
            outs.append(GenOutput(ids, [-0.25] * len(ids), "eos"))
        return outs


def test_eval_episodes_equal_the_training_loop_token_for_token():
    script = {
        "Q1: 2+2?": ["```python\nprint(2+2)\n```<|im_end|>", "\\boxed{4}<|im_end|>"],
        "Q2: 3*3?": ["\\boxed{9}<|im_end|>"],
        "Q3: 10-1?": ["```python\nprint(10-1)\n```<|im_end|>", "```python\nprint(9)\n```<|im_end|>", "\\boxed{9}<|im_end|>"],
    }
    outputs = {"print(2+2)": "4\n", "print(10-1)": "9\n", "print(9)": "9\n"}
    gen = ScriptedGenerator(script)
    cfg = rollout_cfg()
    eps = run_release_episodes(gen, TOK, list(script), cfg, SamplingParams(temperature=1.0, seed=11), make_tool(
        FakeSandbox(outputs)), hf_model_type="qwen3")
    assert gen.batches == [(3, 11, 3000), (2, 11 + 1000003, 3000), (1, 11 + 2 * 1000003, 3000)]
    for q, ep in zip(script, eps):
        ref, _ = run_training_loop(script[q], FakeSandbox(outputs), question=q)
        assert ep.prompt_ids == ref.prompt_ids and ep.response_ids == ref.response_ids
        assert ep.response_mask == ref.response_mask
    assert [(e.turns, e.tool_calls, e.finish_reason) for e in eps] == [(2, 1, "answer"), (1, 0, "answer"), (3, 2, "answer")]
    assert eps[0].response_text.endswith("\\boxed{4}") and "<tool_response>" in eps[0].response_text


def test_eval_turn_budget_follows_verls_server_and_cuts_the_response():
    long_turn = "y" * 50 + "<|im_end|>"
    cfg = rollout_cfg(max_response_tokens=20, max_prompt_tokens=4000)
    gen = ScriptedGenerator({"Q": [long_turn]})
    (ep,) = run_release_episodes(gen, TOK, ["Q"], cfg, SamplingParams(seed=0), make_tool(FakeSandbox()),
                                 hf_model_type="qwen3")
    assert gen.batches[0][2] == 20 and len(ep.response_ids) == 20 and ep.finish_reason == "max_tokens"
    with pytest.raises(ValueError, match="over rollout.max_prompt_tokens"):
        run_release_episodes(ScriptedGenerator({"Q": []}), TOK, ["Q"], rollout_cfg(max_prompt_tokens=50),
                             SamplingParams(), make_tool(FakeSandbox()), hf_model_type="qwen3")


def test_eval_cli_runs_the_release_protocol_end_to_end(tmp_path, monkeypatch):
    """`python -m ctpo.eval` on the paper config (protocol release): the release loop, the real sandbox,
    scoring and provenance; the generator is scripted (no model), the tokenizer a saved HF tokenizer."""
    import pandas as pd

    from ctpo.agent.protocols import protocol_hash
    from ctpo.eval import backend as B
    from ctpo.eval.__main__ import main
    from ctpo.tokenizer import HFTokenizer

    ckpt = tmp_path / "ckpt"
    TOK.save_pretrained(str(ckpt))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    tok = HFTokenizer(str(ckpt))
    script = {"Add 2 and 3.": ["```python\nprint(2 + 3)\n```<|im_end|>", "It is \\boxed{5}.<|im_end|>"],
              "Add 4 and 4.": ["\\boxed{7}<|im_end|>"],
              "Add 5 and 5.": ["The answer is 10.<|im_end|>"]}  # unboxed: the release's grader credits it

    class Gen(ScriptedGenerator):
        def generate(self, prompts, params, stop):
            for p in prompts:  # every prompt carries the release's system prompt and the tools block
                text = TOK.decode(p)
                assert text.startswith("<|im_start|>system\n" + RELEASE_PROMPT) and "<tools>" in text
            return super().generate(prompts, params, stop)

    gen = Gen({q: t for q, t in script.items()})
    monkeypatch.setattr(B, "build_generator", lambda backend, checkpoint, cfg: (gen, tok))
    rows = [{"data_source": "toy", "ability": "math", "prompt": [{"role": "user", "content": q}],
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"split": "test", "index": i}}
            for i, (q, a) in enumerate([("Add 2 and 3.", "5"), ("Add 4 and 4.", "8"), ("Add 5 and 5.", "10")])]
    bench = tmp_path / "bench.parquet"
    pd.DataFrame(rows).to_parquet(bench, index=False)
    cfg = resolve_run(load_experiment("configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0)
    cfg["eval"].update(k=1, max_problems=3, chunk_size=2)
    cfg["wandb"]["mode"] = "disabled"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "out" / "bench.parquet"
    assert main(["--config", str(tmp_path / "cfg.json"), "--checkpoint", str(ckpt), "--benchmark", str(bench),
                 "--step", "0", "--out", str(out), "--backend", "hf"]) == 0
    recs = pd.read_parquet(out).sort_values("problem_id")
    assert recs.correct.tolist() == [True, False, True] and recs.tool_calls.tolist() == [1, 0, 0]
    assert recs.turns.tolist() == [2, 1, 1]
    # the paper experiment grades with the release's grader; both verdicts are recorded
    assert set(recs.grader) == {"release"} and recs.correct_release.tolist() == recs.correct.tolist()
    assert recs.correct_strict.tolist() == [True, False, False]
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["grader"] == "release" and side["avg_at_k"] == pytest.approx(2 / 3)
    assert side["avg_at_k_by_grader"] == pytest.approx({"release": 2 / 3, "strict": 1 / 3})
    prov = side["provenance"]
    assert prov["tool_protocol"] == "release"
    assert prov["prompt_template_hash"] == protocol_hash("release", "qwen3_tir") != protocol_hash("ctpo_tir", "qwen3_tir")


def test_run_copy_of_agent_loop_yaml_instantiates_the_release_loop_as_verls_worker_does(tmp_path):
    import hydra

    from ctpo.agent.protocols import release_system_prompt as prompt_of
    from ctpo.train.verl_backend import write_agent_loop_config

    cfg = load_run_config(resolve_run(load_experiment("configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0))
    path = write_agent_loop_config(cfg, tmp_path)
    assert prompt_of(path) == RELEASE_PROMPT
    entry = next(e for e in OmegaConf.load(path) if e.name == "ctpo_release")

    async def build():  # the call in verl's AgentLoopWorker._run_agent_loop
        return hydra.utils.instantiate(
            config=entry, trainer_config=DictConfigWrap(config=trainer_config(cfg.rollout)), server_manager=None,
            tokenizer=TOK, processor=None, hf_model_type="qwen3", dataset_cls=None,
            data_config=DictConfigWrap(OmegaConf.create({"apply_chat_template_kwargs": {"enable_thinking": False}})),
            tools=ToolListWrap([make_tool(FakeSandbox())]),
        )

    loop = asyncio.run(build())
    assert isinstance(loop, ReleaseToolAgentLoop) and loop.system_prompt == RELEASE_PROMPT
    assert type(loop.tool_parser).__name__ == "HermesFallbackToolParser" and list(loop.tools) == ["code_interpreter"]
