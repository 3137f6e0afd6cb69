"""HFGenerator on a tiny randomly initialised Qwen3 (CharTokenizer vocab): log-probs checked against an
independent full-sequence forward pass, stop strings, seeding, top-p; plus a real-sandbox rollout whose
model-token log-probs a trainer recomputes exactly from the episode's ids."""
import numpy as np
import pytest
import torch

from ctpo.agent import HFGenerator, SamplingParams, run_episodes
from ctpo.config import RolloutConfig
from ctpo.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = CharTokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return Qwen3ForCausalLM(cfg).eval(), tok


def full_forward_logprobs(model, ids: list[int], start: int, temperature: float) -> np.ndarray:
    """log softmax(logits / T) of ids[start:] given their prefixes: one un-cached, un-padded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()  # (L, V)
    z = logits[start - 1 : len(ids) - 1] / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - start), ids[start:]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_full_forward_with_left_padding(tiny, temperature):
    model, tok = tiny
    prompts = [tok.encode("hi"), tok.encode("a longer prompt here"), tok.encode("mid size")]
    outs = HFGenerator(model, tok).generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=24, seed=3), [])
    for p, o in zip(prompts, outs):
        assert len(o.token_ids) == len(o.log_probs) > 0
        ref = full_forward_logprobs(model, p + o.token_ids, len(p), temperature)
        np.testing.assert_allclose(o.log_probs, ref, atol=2e-5)
        assert o.finish_reason == ("eos" if o.token_ids[-1] == tok.eos_token_id else "length")


def test_seed_reproduces_and_differs(tiny):
    model, tok = tiny
    g = HFGenerator(model, tok)
    p = [tok.encode("seed test")] * 2
    a = g.generate(p, SamplingParams(max_new_tokens=16, seed=1), [])
    b = g.generate(p, SamplingParams(max_new_tokens=16, seed=1), [])
    c = g.generate(p, SamplingParams(max_new_tokens=16, seed=2), [])
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_greedy_is_argmax_and_tiny_top_p_is_greedy(tiny):
    model, tok = tiny
    g = HFGenerator(model, tok)
    p = [tok.encode("greedy")]
    greedy = g.generate(p, SamplingParams(temperature=0.0, max_new_tokens=10), [])[0]
    ids = p[0] + greedy.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expect = [int(logits[len(p[0]) - 1 + j].argmax()) for j in range(len(greedy.token_ids))]
    assert greedy.token_ids == expect
    nucleus = g.generate(p, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=5), [])[0]
    assert nucleus.token_ids == greedy.token_ids


def test_stop_string_ends_the_row_after_the_completing_token(tiny):
    model, tok = tiny
    g = HFGenerator(model, tok)
    free = g.generate([tok.encode("stop test")], SamplingParams(max_new_tokens=30, seed=11), [])[0]
    text = tok.decode(free.token_ids)
    stop = text[4:6]  # a 2-character string the unconstrained sample contains
    first = text.index(stop) + len(stop)
    out = g.generate([tok.encode("stop test")], SamplingParams(max_new_tokens=30, seed=11), [stop])[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first]


def test_rollout_with_real_sandbox_gives_trainer_exact_ids_and_logprobs(tiny):
    model, tok = tiny
    cfg = RolloutConfig(n=1, max_turns=2, max_prompt_tokens=128, max_response_tokens=40, max_obs_tokens=16,
                        template="toy_tir", sandbox_timeout_s=30.0, sandbox_concurrency=2)
    eps = run_episodes(HFGenerator(model, tok), tok, ["Compute 1+2.", "Compute 3*4."], cfg,
                       SamplingParams(temperature=1.0, seed=0))
    for ep in eps:
        assert len(ep.response_ids) == len(ep.response_logprobs) == len(ep.response_mask) <= 40
        assert ep.finish_reason in ("eos", "max_tokens", "answer", "max_turns")
        assert ep.response_text == tok.decode(ep.response_ids)
        ids = ep.prompt_ids + ep.response_ids
        ref = full_forward_logprobs(model, ids, len(ep.prompt_ids), 1.0)
        m = np.array(ep.response_mask, dtype=bool)
        np.testing.assert_allclose(np.array(ep.response_logprobs)[m], ref[m], atol=2e-5)


def test_pruning_finished_rows_keeps_every_row_exact(tiny):
    model, tok = tiny
    prompts = [tok.encode(s) for s in ("a", "bb ccc", "prune me", "x y z w")]
    stop = ["e", "a"]  # frequent characters: rows finish at different steps
    outs = HFGenerator(model, tok, prune=True).generate(prompts, SamplingParams(max_new_tokens=20, seed=4), stop)
    assert len({len(o.token_ids) for o in outs}) > 1
    for p, o in zip(prompts, outs):
        ref = full_forward_logprobs(model, p + o.token_ids, len(p), 1.0)
        np.testing.assert_allclose(o.log_probs, ref, atol=2e-5)
        if o.finish_reason == "stop":  # the last token completed a stop string, no earlier one did
            assert any(s in tok.decode(o.token_ids) for s in stop)
            assert not any(s in tok.decode(o.token_ids[:-1]) for s in stop)


def test_load_policy_round_trips_a_saved_policy(tiny, tmp_path):
    from ctpo.agent import load_policy

    model, tok = tiny
    model.save_pretrained(str(tmp_path))
    tok.save(tmp_path)
    loaded, ltok = load_policy(str(tmp_path), device="cpu", dtype="float32")
    assert isinstance(ltok, CharTokenizer) and not loaded.training
    ids = torch.tensor([tok.encode("round trip")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(FileNotFoundError, match="not a loadable policy"):
        load_policy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        load_policy(str(tmp_path), dtype="float33")
