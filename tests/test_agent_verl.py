"""The verl integration on CPU: the `ctpo_tir` agent loop driven by a fake async server manager, and
`PythonSandboxTool.execute` with the real sandbox and an infra-failing double."""
import asyncio

import pytest
from omegaconf import OmegaConf

pytest.importorskip("verl.experimental.agent_loop.agent_loop")

from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from ctpo.agent.template import render_prompt  # noqa: E402
from ctpo.agent.verl_loop import CtpoTirAgentLoop, rollout_config_from  # noqa: E402
from ctpo.agent.verl_tool import PythonSandboxTool  # noqa: E402
from ctpo.config import CONFIG_DIR, ConfigError  # noqa: E402
from ctpo.sandbox import ExecResult  # noqa: E402
from ctpo.tokenizer import SPECIAL_TOKENS, CharTokenizer  # noqa: E402

TOK = CharTokenizer()
EOS = "<|im_end|>"


class HFStyleTokenizer:
    """The char tokenizer behind the transformers call signatures verl uses."""

    eos_token_id = TOK.eos_token_id
    pad_token_id = TOK.pad_token_id

    def encode(self, text, add_special_tokens=False):
        return TOK.encode(text)

    def decode(self, ids, skip_special_tokens=False):
        return TOK.decode(ids)

    def get_added_vocab(self):
        return {t: TOK.encode(t)[0] for t in SPECIAL_TOKENS}


class FakeServerManager:
    """verl's LLMServerClient.generate signature; replays scripted turns, honouring stop and max_tokens."""

    def __init__(self, turns):
        self.turns = list(turns)
        self.requests = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.requests.append((list(prompt_ids), dict(sampling_params)))
        ids = TOK.encode(self.turns.pop(0))
        for k in range(1, len(ids) + 1):
            if ids[k - 1] == TOK.eos_token_id or any(s in TOK.decode(ids[:k]) for s in sampling_params["stop"]):
                ids = ids[:k]
                break
        ids = ids[: sampling_params["max_tokens"]]
        return TokenOutput(token_ids=ids, log_probs=[-0.25] * len(ids), stop_reason="completed")


def make_loop(turns, response_length=300, **rollout):
    multi_turn = {"max_assistant_turns": 3, "max_tool_response_length": 40}
    trainer_cfg = OmegaConf.create({"actor_rollout_ref": {"rollout": {
        "prompt_length": 256, "response_length": response_length, "multi_turn": multi_turn}}})
    server = FakeServerManager(turns)
    ro = dict(template="toy_tir", sandbox_timeout_s=30.0, sandbox_concurrency=1)
    ro.update(rollout)
    loop = CtpoTirAgentLoop(
        trainer_config=DictConfigWrap(trainer_cfg), server_manager=server, tokenizer=HFStyleTokenizer(),
        processor=None, dataset_cls=None, data_config=DictConfigWrap(OmegaConf.create({})), rollout=ro,
    )
    return loop, server


def run(loop, question="What is 6*7?"):
    raw_prompt = [{"role": "user", "content": question}]
    return asyncio.run(loop.run({"temperature": 1.0, "top_p": 1.0}, raw_prompt=raw_prompt))


def test_importing_the_loop_keeps_the_runs_configured_entry():
    """verl loads the run's agent_loop.yaml into its registry, then the first trajectory imports the module:
    the configured `rollout` must survive the import (it was replaced by a bare entry: later trajectories
    ran with the default qwen3_tir template instead of the run's)."""
    import importlib

    import ctpo.agent.verl_loop as verl_loop

    saved = _agent_loop_registry.get("ctpo_tir")
    configured = OmegaConf.create({"name": "ctpo_tir", "_target_": "ctpo.agent.verl_loop.CtpoTirAgentLoop",
                                   "rollout": {"template": "toy_tir"}})
    try:
        _agent_loop_registry["ctpo_tir"] = configured  # what AgentLoopWorker.__init__ does
        importlib.reload(verl_loop)  # what the first hydra.utils.instantiate does in a fresh worker
        assert _agent_loop_registry["ctpo_tir"] is configured
        _agent_loop_registry.pop("ctpo_tir")
        importlib.reload(verl_loop)  # without a config file, importing still registers the loop
        assert _agent_loop_registry["ctpo_tir"] == {"_target_": "ctpo.agent.verl_loop.CtpoTirAgentLoop"}
    finally:
        if saved is not None:
            _agent_loop_registry["ctpo_tir"] = saved


def test_registered_and_yaml_target_is_importable():
    assert _agent_loop_registry["ctpo_tir"]["_target_"] == "ctpo.agent.verl_loop.CtpoTirAgentLoop"
    entries = OmegaConf.load(CONFIG_DIR / "verl" / "agent_loop.yaml")
    assert entries[0].name == "ctpo_tir" and entries[0]._target_ == "ctpo.agent.verl_loop.CtpoTirAgentLoop"
    assert rollout_config_from(entries[0].rollout).template == "qwen3_tir"  # every key is a RolloutConfig field


def test_agent_loop_multi_turn_with_real_sandbox():
    code, answer = "```python\nprint(6*7)\n```\n", "\\boxed{42}" + EOS
    loop, server = make_loop([code, answer])
    out = run(loop)
    assert out.prompt_ids == TOK.encode(render_prompt("What is 6*7?", "toy_tir"))
    obs = TOK.encode("\nCode execution result: 42\n\n")
    assert out.response_ids == TOK.encode(code) + obs + TOK.encode(answer)
    assert out.response_mask == [1] * len(TOK.encode(code)) + [0] * len(obs) + [1] * len(TOK.encode(answer))
    assert out.response_logprobs == [-0.25 if m else 0.0 for m in out.response_mask]
    assert out.extra_fields["finish_reason"] == "answer" and out.extra_fields["tool_calls"] == 1
    # the second request continues the exact token context; stop strings and log-probs requested
    assert server.requests[1][0] == out.prompt_ids + TOK.encode(code) + obs
    sp = server.requests[0][1]
    assert sp["stop"] == ["\n```\n"] and sp["logprobs"] is True and sp["max_tokens"] == 300


def test_agent_loop_void_and_infra_trajectories_are_masked_out():
    loop, _ = make_loop(["Hmm." + EOS], void_turn_masking=True)
    out = run(loop)
    assert out.extra_fields["void"] == 1 and set(out.response_mask) == {0}

    class Down:
        def run_many(self, codes):
            return [ExecResult("", "", None, False, False, 0.0, "infra", "pool down") for _ in codes]

    loop, _ = make_loop(["```python\nprint(1)\n```\n", "\\boxed{1}" + EOS])
    loop.run_batch = Down().run_many
    out = run(loop)
    assert out.extra_fields["finish_reason"] == "infra" and out.extra_fields["infra_failures"] == 1
    assert set(out.response_mask) == {0}


def test_agent_loop_budgets_come_from_verl_config():
    loop, _ = make_loop(["```python\nprint(1)\n```\n"] * 4, response_length=300)
    assert (loop.cfg.max_turns, loop.cfg.max_obs_tokens, loop.cfg.max_response_tokens) == (3, 40, 300)
    out = run(loop)
    assert out.extra_fields["finish_reason"] == "max_turns" and out.num_turns == 1 + 3 + 2


def test_agent_loop_rejects_unknown_rollout_keys():
    with pytest.raises(ConfigError, match="agent_loop.yaml"):
        make_loop([], max_turnz=3)


def test_tool_from_verl_config_runs_code_in_sandbox():
    (tool,) = initialize_tools_from_config(str(CONFIG_DIR / "verl" / "tool_config.yaml"))
    assert isinstance(tool, PythonSandboxTool) and tool.name == "code_interpreter"
    resp, reward, metrics = asyncio.run(tool.execute("i0", {"code": "print(sum(range(10)))"}))
    assert resp.text == "\nCode execution result: 45\n\n" and reward == 0.0
    assert metrics == {"status": "ok", "attempts": 1, "infra_failure": 0}
    fast = PythonSandboxTool({**tool.config, "timeout_s": 1.0})
    resp, _, metrics = asyncio.run(fast.execute("i1", {"code": "while True:\n    pass"}))
    assert metrics["status"] == "timeout" and resp.text.startswith("\nCode execution result: ")
    resp, _, metrics = asyncio.run(fast.execute("i2", {"code": ""}))
    assert metrics["status"] == "error" and "non-empty" in resp.text


def test_tool_retries_infra_and_hides_it():
    class Flaky:
        n = 0

        def run_many(self, codes):
            Flaky.n += 1
            status = "infra" if Flaky.n < 3 else "ok"
            return [ExecResult("7\n" if status == "ok" else "", "", 0, False, False, 0.0, status) for _ in codes]

    cfg = {"type": "native", "template": "toy_tir", "timeout_s": 5.0, "obs_max_chars": 512, "concurrency": 1}
    tool = PythonSandboxTool(cfg, sandbox=Flaky())
    resp, _, metrics = asyncio.run(tool.execute("i", {"code": "print(7)"}))
    assert resp.text == "\nCode execution result: 7\n\n" and metrics["attempts"] == 3
    with pytest.raises(ConfigError, match="unknown key"):
        PythonSandboxTool({**cfg, "timout": 1})


def test_loops_share_one_sandbox_pool_per_setting():
    a, _ = make_loop([])
    b, _ = make_loop([])
    assert a.run_batch.__self__ is b.run_batch.__self__  # the same SandboxPool's bound run_many
    c, _ = make_loop([], sandbox_concurrency=2)
    assert c.run_batch.__self__ is not a.run_batch.__self__


class VersionedServerManager(FakeServerManager):
    """Like verl's LLMServerClient: each output carries the server's weight version (`global_steps`) and
    the client tags it as min/max_global_steps; the weights move from step 3 to step 4 between turns."""

    def __init__(self, turns, versions):
        super().__init__(turns)
        self.versions = list(versions)

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        g = self.versions.pop(0)
        out.extra_fields = {"global_steps": g, "min_global_steps": g, "max_global_steps": g}
        return out


def test_agent_loop_carries_verls_weight_versions_across_turns():
    """verl's V1 trainer reads min/max_global_steps of every trajectory as int after each step; a loop that
    drops them crashes the run right after step 1 is saved."""
    import numpy as np

    loop, _ = make_loop([])
    loop.server_manager = VersionedServerManager(["```python\nprint(6*7)\n```\n", "\\boxed{42}" + EOS], [3, 4])
    out = run(loop)
    assert out.extra_fields["min_global_steps"] == 3 and out.extra_fields["max_global_steps"] == 4
    tags = [out.extra_fields, out.extra_fields]
    spans = np.array([t["max_global_steps"] for t in tags], dtype=int) - np.array(
        [t["min_global_steps"] for t in tags], dtype=int)  # verl trainer_base: the conversion that failed on None
    assert spans.tolist() == [1, 1]
