"""The `cpu` device profile of the verl launcher without Ray: the composed config, the one-line version pin,
the toy tokenizer verl loads, and the HF rollout server's contract (tokens, log-probs, stop strings,
budgets, weight updates) checked against an independent forward pass."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")

from ctpo.config import ModelConfig, load_experiment, load_run_config, resolve_run  # noqa: E402
from ctpo.tokenizer import CharTokenizer  # noqa: E402
from ctpo.train import verl_backend as vb  # noqa: E402
from ctpo.train import verl_command as vc  # noqa: E402
from test_verl_backend import verl_argv  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _toy_cfg(run="toy_ctpo"):
    d = resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"), run, 0)
    return load_run_config(d)


def _compose(argv):
    import os

    import verl
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        return compose("ppo_trainer", overrides=argv)


# the cpu profile's device keys, written out here (ctpo.train.verl_command builds them after the paper run's keys)
CPU_DEVICE_KEYS = {
    "actor_rollout_ref.model.override_config.attn_implementation", "actor_rollout_ref.actor.strategy",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile", "actor_rollout_ref.actor.use_torch_compile",
    "actor_rollout_ref.actor.fsdp_config.dtype", "actor_rollout_ref.actor.fsdp_config.mixed_precision",
    "actor_rollout_ref.rollout.free_cache_engine", "trainer.device", "ray_kwargs.ray_init.num_gpus",
    "ray_kwargs.ray_init.num_cpus", "transfer_queue.backend.SimpleStorage.num_data_storage_units",
    "actor_rollout_ref.rollout.agent.num_workers", "reward.num_workers", "data.dataloader_num_workers",
}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+")


@pytest.mark.parametrize("run", ["toy_ctpo", "toy_grpo"])
def test_cpu_profile_adds_only_device_keys_and_passes_verl_validation(tmp_path, run):
    """The same run on the gpu device: the cpu command is the gpu command with the rollout engine named `hf` and
    the device keys appended; every train.verl value is the config's (the profile asserts, never overwrites)."""
    import dataclasses

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _toy_cfg(run)
    argv = verl_argv(cfg, tmp_path / "w", init=tmp_path / "policy")[3:]
    keys = [_key(a) for a in argv]
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, dupes  # one value per key
    on_gpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, verl_device="gpu"))
    gpu = verl_argv(on_gpu, tmp_path / "w", init=tmp_path / "policy")[3:]
    assert argv[:len(gpu)] == [a.replace("rollout.name=vllm", "rollout.name=hf") for a in gpu]
    assert {_key(a) for a in argv[len(gpu):]} == CPU_DEVICE_KEYS
    c = _compose(argv)
    assert c.actor_rollout_ref.rollout.name == "hf" and c.actor_rollout_ref.actor.strategy == "fsdp2"
    assert c.actor_rollout_ref.model.use_remove_padding is False and c.trainer.device == "cpu"
    assert c.actor_rollout_ref.model.path == str((tmp_path / "policy").resolve())
    # the paper's structure stays: groups, our agent loop, reward, rollout IS, loss
    assert c.actor_rollout_ref.rollout.agent.default_agent_loop == "ctpo_tir"
    assert c.reward.custom_reward_function.path == "pkg://ctpo.reward"
    assert c.algorithm.rollout_correction.rollout_is == "sequence" and c.actor_rollout_ref.rollout.n == 4
    validate_config(config=c, use_reference_policy=need_reference_policy(c), use_critic=need_critic(c))


@pytest.mark.parametrize("key, value", [("param_offload", True), ("optimizer_offload", True),
                                        ("use_remove_padding", True), ("gradient_checkpointing", True)])
def test_cpu_profile_asserts_its_verl_values_naming_the_key(key, value):
    from ctpo.config import ConfigError

    d = resolve_run(load_experiment(REPO / "configs/experiments/toy_verl.yaml"), "toy_ctpo", 0)
    assert d["train"]["verl"][key] is False  # toy_verl states the profile's value
    d["train"]["verl"][key] = value
    with pytest.raises(ConfigError, match=rf"^run config: train\.verl\.{key}: the cpu device profile "
                                          rf"\(train\.verl_device cpu\) needs false, got true$"):
        load_run_config(d)
    d["train"]["verl_device"] = "gpu"  # the paper's device takes it
    assert getattr(load_run_config(d).train.verl, key) is True


def test_gpu_profile_is_the_paper_command(tmp_path):
    cfg = load_run_config(resolve_run(load_experiment(REPO / "configs/experiments/paper.yaml"), "qwen3_4b_ctpo", 0))
    argv, env = vc.verl_command(cfg, tmp_path / "w", vb.launch_state(cfg, tmp_path / "w", record=False))
    assert "actor_rollout_ref.rollout.name=vllm" in argv and not any(a.startswith("trainer.device=") for a in argv)
    assert not {_key(a) for a in argv} & CPU_DEVICE_KEYS and "VERL_PLATFORM" not in env


def test_cpu_profile_needs_the_pinned_verl(monkeypatch, tmp_path, capsys):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.9.2")
    with pytest.raises(vb.VerlRunError, match=r"needs verl 0\.9\.1 .* found verl 0\.9\.2"):
        vb.require_device(_toy_cfg())
    bad = tmp_path / "c.json"
    import json
    from dataclasses import asdict

    bad.write_text(json.dumps(asdict(_toy_cfg())))
    assert vb.cli(["run", "--config", str(bad), "--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "w"),
                   "--init", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verl 0.9.1" in err[0]
    assert not (tmp_path / "w").exists()  # checked before the run claims its workdir


def test_toy_policy_dir_carries_an_identical_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    c = CharTokenizer()
    c.save(tmp_path)
    h = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nWhat is 6*7?  \u00e9<|im_end|>\n<think>\n\n</think>\n\n```python\nprint(1 < 2)\n```\n"
    assert h.encode(text, add_special_tokens=False) == c.encode(text)
    assert h.decode(c.encode(text), skip_special_tokens=False) == c.decode(c.encode(text))
    assert (h.eos_token_id, h.pad_token_id, len(h)) == (c.eos_token_id, c.pad_token_id, c.vocab_size)
    chat = h.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from ctpo.train.toy_model import build_toy_model, save_policy

    d = tmp_path_factory.mktemp("toy") / "policy"
    tok = CharTokenizer()
    save_policy(build_toy_model(ModelConfig(name="toy"), tok, 0), tok, d)
    return d


def test_hf_rollout_server_returns_verls_token_output_with_true_log_probs(toy_dir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from ctpo.train.verl_cpu.rollout import HFRolloutServer

    server = HFRolloutServer(SimpleNamespace(seed=0), SimpleNamespace(local_path=str(toy_dir), path=str(toy_dir)))
    tok = CharTokenizer()
    prompts = [tok.encode("<|im_start|>user\n1+1<|im_end|>\n"), tok.encode("<|im_start|>user\n22*3<|im_end|>\n")]
    sp = {"temperature": 1.0, "top_p": 1.0, "stop": ["\n```\n"], "max_tokens": 12}

    async def both():
        return await asyncio.gather(server.generate(prompts[0], dict(sp), "a"),
                                    server.generate(prompts[1], dict(sp, max_tokens=5), "b"))

    outs = asyncio.run(both())
    assert len(outs[0].token_ids) <= 12 and len(outs[1].token_ids) <= 5  # each row cut at its own budget
    assert outs[0].extra_fields == {"global_steps": None}
    ref = AutoModelForCausalLM.from_pretrained(toy_dir, torch_dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        assert len(o.log_probs) == len(o.token_ids) > 0
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(ref(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
        expect = lp.gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(o.log_probs), expect, rtol=1e-4, atol=1e-4)
    # a weight update (what the worker-side adapter sends) changes the policy and tags the weight version
    state = {k: torch.zeros_like(v) if k.endswith("norm.weight") and "model.norm" in k else v.clone()
             for k, v in ref.state_dict().items()}
    assert server.update_weights(state, global_steps=7) == len(state)
    o = asyncio.run(server.generate(prompts[0], dict(sp, temperature=0.0), "c"))
    assert o.extra_fields == {"global_steps": 7}
    uniform = -torch.log(torch.tensor(float(tok.vocab_size)))
    assert all(abs(x - uniform.item()) < 1e-4 for x in o.log_probs)  # a zero final norm: uniform logits


def test_toy_verl_runs_start_from_the_shared_warm_start():
    """The DAG gives every toy-model run the SFT warm start, on either backend (verl: `--init`)."""
    from ctpo.configure import warmstart_config

    exp = load_experiment(REPO / "configs/experiments/toy_verl.yaml")
    ws = warmstart_config(exp, 0)
    assert ws["model"]["kind"] == "toy" and ws["train"]["backend"] == "verl"
    smk = (REPO / "workflow/rules/common.smk").read_text()
    assert 'if needs_warmstart(wildcards) else []' in smk and 'inputs["sft"]' in smk
