"""The typed run config: composition order, unknown keys fail loudly naming the key, batch checks."""
import json

import pytest

from ctpo.config import (
    ConfigError,
    canonical_json,
    config_hash,
    effective_batch_sizes,
    load_experiment,
    load_run_config,
    resolve_run,
)


@pytest.fixture(scope="module")
def paper():
    return load_experiment("configs/experiments/paper.yaml")


@pytest.fixture(scope="module")
def toy():
    return load_experiment("configs/experiments/toy.yaml")


def test_paper_ctpo_run_carries_the_papers_loss_and_schedule(paper):
    cfg = load_run_config(resolve_run(paper, "qwen3_4b_ctpo", 0))
    assert (cfg.loss.method, cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.power) == ("ctpo", 0.025, 0.05, 0.5)
    assert cfg.loss.dual_clip_c == 0.05
    assert cfg.model.path == "Qwen/Qwen3-4B"
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.train.mini_batch_prompts) == (512, 8, 32)
    assert cfg.train.lr == 1e-6 and cfg.train.total_steps == 305
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_response_tokens, cfg.rollout.max_turns) == (16000, 8000, 5)
    assert effective_batch_sizes(cfg)["optimizer_steps_per_rollout"] == 16
    assert effective_batch_sizes(cfg)["responses_per_step"] == 4096


def test_fixed_clip_ablation_differs_from_ctpo_only_in_the_loss(paper):
    a = resolve_run(paper, "qwen3_14b_ctpo", 0)
    b = resolve_run(paper, "qwen3_14b_ctpo_fixed", 0)
    assert b["loss"]["fixed_bounds"] == [0.5, 5.0]
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"run", "loss"}


def test_gspo_uses_seq_mean_token_mean_and_its_tiny_clip(paper):
    cfg = load_run_config(resolve_run(paper, "qwen3_14b_gspo", 0))
    assert cfg.loss.loss_agg_mode == "seq-mean-token-mean"
    assert (cfg.loss.clip_ratio_low, cfg.loss.clip_ratio_high) == (3e-4, 4e-4)


def test_unknown_key_fails_naming_the_key(paper):
    bad = dict(paper, defaults={**paper["defaults"], "train": {**paper["defaults"]["train"], "lr_typo": 1.0}})
    with pytest.raises(ConfigError, match="lr_typo"):
        resolve_run(bad, "qwen3_4b_ctpo", 0)


def test_unknown_run_lists_the_known_ones(toy):
    with pytest.raises(ConfigError, match="toy_ctpo"):
        resolve_run(toy, "toy_nope", 0)


def test_indivisible_minibatch_is_rejected_before_anything_starts(toy):
    bad = json.loads(json.dumps(toy))
    bad["defaults"]["train"]["mini_batch_prompts"] = 5
    with pytest.raises(ConfigError, match="divisible"):
        resolve_run(bad, "toy_ctpo", 0)


def test_lengths_over_the_models_context_are_rejected(toy):
    bad = json.loads(json.dumps(toy))
    bad["defaults"]["rollout"]["max_response_tokens"] = 100_000
    with pytest.raises(ConfigError, match="context_length"):
        resolve_run(bad, "toy_ctpo", 0)


def test_canonical_json_is_order_independent_and_hash_tracks_content(toy):
    a = resolve_run(toy, "toy_ctpo", 0)
    shuffled = json.loads(json.dumps(a, sort_keys=False))
    assert canonical_json(dict(reversed(list(shuffled.items())))) == canonical_json(a)
    assert config_hash(a) != config_hash(resolve_run(toy, "toy_ctpo", 1))


def test_run_config_round_trips_through_a_json_file(tmp_path, toy):
    d = resolve_run(toy, "toy_grpo", 0)
    p = tmp_path / "run.json"
    p.write_text(canonical_json(d))
    cfg = load_run_config(p)
    assert cfg.loss.method == "grpo" and cfg.run == "toy_grpo" and cfg.label == "toy"


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="x.yaml"):
        load_experiment(p)


def test_fixed_ablation_config_is_fixed_at_every_position(paper):
    b = load_run_config(resolve_run(paper, "qwen3_14b_ctpo_fixed", 0))
    assert b.loss.dual_clip_c is None and b.loss.fixed_dual_clip == 5.0  # constant cap = the upper bound
    bad = json.loads(json.dumps(paper))
    bad["runs"]["qwen3_14b_ctpo_fixed"]["overrides"] = {"loss": {"dual_clip_c": 0.05}}
    with pytest.raises(ConfigError, match="loss.dual_clip_c: method ctpo_fixed must not scale"):
        resolve_run(bad, "qwen3_14b_ctpo_fixed", 0)
    bad["runs"]["qwen3_14b_ctpo_fixed"]["overrides"] = {"loss": {"fixed_dual_clip": 2.0}}
    with pytest.raises(ConfigError, match="tighter than the upper bound"):
        resolve_run(bad, "qwen3_14b_ctpo_fixed", 0)
    bad["runs"]["qwen3_14b_ctpo"]["overrides"] = {"loss": {"fixed_dual_clip": 5.0}}
    with pytest.raises(ConfigError, match="only for method ctpo_fixed"):
        resolve_run(bad, "qwen3_14b_ctpo", 0)


def test_the_papers_training_values_exist_once(paper, toy):
    """paper.yaml states the paper's train / verl values and ctpo/config.py does not repeat them: each key
    paper.yaml sets under train (and train.verl) has no default or a different one there; a toy experiment
    that leaves one out fails naming it."""
    import dataclasses

    from ctpo.config import TrainConfig, VerlConfig

    for cls, values in ((TrainConfig, paper["defaults"]["train"]), (VerlConfig, paper["defaults"]["train"]["verl"])):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            f = fields[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert default == "???" or default != value, f"{cls.__name__}.{key} repeats paper.yaml's {value!r}"
    bad = json.loads(json.dumps(toy))
    del bad["defaults"]["train"]["weight_decay"]
    with pytest.raises(ConfigError, match=r"train\.weight_decay: required, no default"):
        resolve_run(bad, "toy_ctpo", 0)
