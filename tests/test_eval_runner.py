"""ctpo.eval.runner and the `python -m ctpo.eval` entry point: records, resume, infra redraws, provenance."""
from __future__ import annotations

import hashlib
import logging
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from ctpo.agent.generation import GenOutput
from ctpo.agent.loop import run_episodes
from ctpo.config import REPO_ROOT, RolloutConfig
from ctpo.eval import runner
from ctpo.grading import grade_all
from ctpo.schema import EVAL_COLUMNS
from ctpo.tokenizer import CharTokenizer

GRADE = grade_all("strict")  # records carry both graders' verdicts; `correct` is the strict one's

QUESTIONS = {"Add 2 and 3.": "5", "Add 4 and 4.": "8", "Add 1 and 6.": "7"}


# ----------------------------------------------------------------------------- test doubles


@dataclass
class FakeExec:
    status: str
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    timed_out: bool = False
    truncated: bool = False
    wall_s: float = 0.0
    detail: str = ""


class EchoSandbox:
    """Runs nothing: `print(X)` prints X. The first `fail_calls` batches fail with status "infra"."""

    def __init__(self, fail_calls: int = 0) -> None:
        self.fail_calls = fail_calls
        self.calls = 0

    def run_many(self, codes, timeout_s=None):
        self.calls += 1
        if self.calls <= self.fail_calls:
            return [FakeExec("infra", detail="worker lost") for _ in codes]
        return [FakeExec("ok", stdout=c.strip()[len("print("):-1] + "\n") for c in codes]


class ScriptedGenerator:
    """A Generator whose rows depend on the batch seed AND the row's position in the batch (like a
    single torch.Generator over a batch), so resuming is only exact if chunks are drawn identically.

    First turn: ~1/3 a code block printing an answer, ~1/3 a boxed answer, ~1/3 text with no answer.
    After an observation: box the printed value."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.batches = 0

    def generate(self, prompts, params, stop):
        self.batches += 1
        rng = random.Random(params.seed)
        outs = []
        for ids in prompts:
            text = self.tok.decode(ids)
            u, v = rng.random(), rng.randint(0, 1)
            question = next(q for q in QUESTIONS if q in text)
            guess = int(QUESTIONS[question]) + v  # right half of the time
            if "Code execution result: " in text:
                printed = text.rsplit("Code execution result: ", 1)[1].strip()
                reply = f"So \\boxed{{{printed}}}<|im_end|>"
            elif u < 1 / 3:
                reply = f"```python\nprint({guess})\n```\n"
            elif u < 2 / 3:
                reply = f"It is \\boxed{{{guess}}}<|im_end|>"
            else:
                reply = "I am not sure.<|im_end|>"
            tids = self.tok.encode(reply)
            outs.append(GenOutput(tids, [-0.5] * len(tids), "stop" if reply.endswith("```\n") else "eos"))
        return outs


ROLLOUT = RolloutConfig(template="toy_tir", max_turns=3, max_prompt_tokens=128, max_response_tokens=96)


def _problems() -> list[runner.Problem]:
    return [runner.Problem(str(i), q, a) for i, (q, a) in enumerate(QUESTIONS.items())]


def _plan(k=4, chunk_size=5, fp="fp-A") -> runner.EvalPlan:
    return runner.EvalPlan(_problems(), k, chunk_size, (0, 10, "toy"), fp)


class Rollout:
    """rollout(questions, seed) over the scripted generator; can 'crash' after n calls."""

    def __init__(self, sandbox=None, crash_after: int | None = None) -> None:
        self.tok = CharTokenizer()
        self.gen = ScriptedGenerator(self.tok)
        self.sandbox = sandbox or EchoSandbox()
        self.crash_after = crash_after
        self.calls: list[list[str]] = []

    def __call__(self, questions, seed):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(list(questions))
        from ctpo.agent.generation import SamplingParams

        params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=96, seed=seed)
        return run_episodes(self.gen, self.tok, questions, ROLLOUT, params, self.sandbox)


# ----------------------------------------------------------------------------- benchmark loading


def _write_verl(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _verl_row(question: str, answer: str, index: int) -> dict:
    return {
        "data_source": "toy", "ability": "math",
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "test", "index": index},
    }


def test_load_benchmark_reads_verl_schema_file():
    path = REPO_ROOT / "data" / "benchmarks" / "aime25.parquet"
    raw = pd.read_parquet(path)
    problems = runner.load_benchmark(path)
    assert len(problems) == len(raw) == 30
    assert problems[0].problem_id == str(raw["id"].iloc[0])
    assert problems[0].question == raw["prompt"].iloc[0][0]["content"]
    assert problems[0].ground_truth == raw["reward_model"].iloc[0]["ground_truth"]
    assert [p.problem_id for p in runner.load_benchmark(path, max_problems=3)] == [str(x) for x in raw["id"][:3]]


def test_load_benchmark_falls_back_to_extra_info_index(tmp_path):
    path = _write_verl(tmp_path / "b.parquet", [_verl_row("Add 2 and 3.", "5", 7), _verl_row("Add 1 and 1.", "2", 9)])
    assert [(p.problem_id, p.question, p.ground_truth) for p in runner.load_benchmark(path)] == [
        ("7", "Add 2 and 3.", "5"), ("9", "Add 1 and 1.", "2"),
    ]


def test_load_benchmark_errors_name_the_file(tmp_path):
    dup = _write_verl(tmp_path / "dup.parquet", [_verl_row("a", "1", 3), _verl_row("b", "2", 3)])
    with pytest.raises(runner.BenchmarkError, match=r"dup\.parquet: problem id '3' occurs more than once"):
        runner.load_benchmark(dup)
    nogt = tmp_path / "nogt.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "q"}]], "id": ["0"]}).to_parquet(nogt)
    with pytest.raises(runner.BenchmarkError, match=r"nogt\.parquet: missing column 'reward_model'"):
        runner.load_benchmark(nogt)
    with pytest.raises(runner.BenchmarkError, match="not found"):
        runner.load_benchmark(tmp_path / "absent.parquet")


def test_chunks_cover_every_pair_once_in_fixed_order():
    chunks = runner.plan_chunks(3, 4, 5)
    flat = [pair for c in chunks for pair in c]
    assert flat == [(p, j) for p in range(3) for j in range(4)]
    assert [len(c) for c in chunks] == [5, 5, 2]
    with pytest.raises(ValueError, match="eval.k must be >= 1"):
        _plan(k=0)
    with pytest.raises(ValueError, match="eval.chunk_size must be >= 1"):
        _plan(chunk_size=0)


# ----------------------------------------------------------------------------- records


def test_records_score_each_sample_and_match_hand_counts(tmp_path):
    recs = runner.evaluate(_plan(), Rollout(), GRADE, tmp_path / "x.partial.parquet")
    assert list(recs.columns) == list(EVAL_COLUMNS)
    for col, kind in EVAL_COLUMNS.items():
        check = {"str": pd.api.types.is_string_dtype, "int64": lambda s: s.dtype == "int64",
                 "bool": pd.api.types.is_bool_dtype}[kind]
        assert check(recs[col]), (col, recs[col].dtype)
    assert len(recs) == 12
    assert list(zip(recs.problem_id, recs.sample_index)) == [(str(p), j) for p in range(3) for j in range(4)]
    for r in recs.itertuples():
        if r.extraction_failed:
            assert r.extracted_answer == "" and not r.correct
        else:
            assert r.correct == (int(r.extracted_answer) == int(r.ground_truth))
        assert r.turns == r.tool_calls + 1  # code turn, then the boxed answer
    assert recs.tool_calls.max() == 1 and recs.tool_calls.min() == 0
    assert recs.extraction_failed.any() and recs.correct.any() and not recs.correct.all()


def test_interrupted_evaluation_resumes_to_identical_records(tmp_path, caplog):
    full = runner.evaluate(_plan(), Rollout(), GRADE, tmp_path / "full.partial.parquet")
    partial = tmp_path / "cut.partial.parquet"
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(_plan(), Rollout(crash_after=1), GRADE, partial)
    kept = pd.read_parquet(partial)
    assert list(zip(kept.problem_id, kept.sample_index)) == [("0", 0), ("0", 1), ("0", 2), ("0", 3), ("1", 0)]
    resumed_rollout = Rollout()
    caplog.set_level(logging.INFO, logger="ctpo.eval.runner")
    resumed = runner.evaluate(_plan(), resumed_rollout, GRADE, partial)
    assert len(resumed_rollout.calls) == 2  # only the two unfinished chunks are drawn
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chunk ")]
    assert [m.split(" elapsed")[0] for m in progress] == ["chunk 2/3 done: samples 10/12", "chunk 3/3 done: samples 12/12"]
    assert progress[-1].endswith("eta 0s")
    pd.testing.assert_frame_equal(resumed, full)


def test_resume_keeps_finished_records_and_ignores_stale_partials(tmp_path):
    partial = tmp_path / "p.partial.parquet"
    first = runner.evaluate(_plan(chunk_size=4), Rollout(), GRADE, tmp_path / "ref.partial.parquet")
    done = first[first.problem_id == "0"].assign(turns=99)  # marks records that must be kept, not redrawn
    runner.write_partial(partial, done, "fp-A")
    roll = Rollout()
    out = runner.evaluate(_plan(chunk_size=4), roll, GRADE, partial)
    assert len(roll.calls) == 2 and (out[out.problem_id == "0"].turns == 99).all()
    runner.write_partial(partial, done, "fp-OTHER")  # another checkpoint / config: never mixed in
    roll = Rollout()
    out = runner.evaluate(_plan(chunk_size=4), roll, GRADE, partial)
    assert len(roll.calls) == 3 and (out.turns < 99).all()


def test_infra_failures_are_redrawn_not_scored(tmp_path):
    # the agent loop retries a failing sandbox twice (3 calls) and gives up; the runner redraws
    roll = Rollout(sandbox=EchoSandbox(fail_calls=3))
    recs = runner.evaluate(_plan(k=4, chunk_size=12), roll, GRADE, tmp_path / "a.partial.parquet")
    assert len(roll.calls) == 2 and len(roll.calls[1]) < 12  # one redraw of the failed samples only
    assert len(recs) == 12 and recs.tool_calls.max() == 1


def test_persistent_infra_failure_stops_and_keeps_finished_chunks(tmp_path):
    class BreaksAfterFirstChunk(Rollout):
        def __call__(self, questions, seed):
            if self.calls:
                self.sandbox.fail_calls = 10**9
            return super().__call__(questions, seed)

    partial = tmp_path / "b.partial.parquet"
    with pytest.raises(RuntimeError, match="sandbox infrastructure"):
        runner.evaluate(_plan(k=4, chunk_size=4), BreaksAfterFirstChunk(), GRADE, partial)
    assert set(pd.read_parquet(partial).problem_id) == {"0"}


def test_derive_seed_is_stable_and_distinct():
    assert runner.derive_seed(0, 10, "aime25", "3", 0) == runner.derive_seed(0, 10, "aime25", "3", 0)
    digest = hashlib.sha256(b"0|10|aime25|3|0").digest()
    assert runner.derive_seed(0, 10, "aime25", "3", 0) == int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    assert len({runner.derive_seed(s, 10, "aime25") for s in range(50)}) == 50


# ----------------------------------------------------------------------------- the CLI, end to end


def _tiny_policy(directory: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    ))
    model.save_pretrained(str(directory))
    tok.save(directory)
    return directory


def _run_config(path: Path) -> Path:
    from ctpo.config import load_experiment, resolve_run

    cfg = resolve_run(load_experiment(REPO_ROOT / "configs" / "experiments" / "toy.yaml"), "toy_ctpo", 0)
    cfg["eval"].update(k=2, max_problems=2, chunk_size=3)
    cfg["rollout"].update(max_turns=2, max_response_tokens=20)
    cfg["wandb"]["mode"] = "offline"
    path.write_text(json.dumps(cfg))
    return path


def _no_network() -> list[str]:
    """`unshare -n` (a network namespace with no interfaces; the sandbox then nests its own namespaces) when
    this user may create one, as tests/test_hub.py."""
    import shutil

    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def _offline_env(tmp_path: Path) -> dict:
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)  # an empty HF cache: nothing but the checkpoint directory to load
    return env


def test_cli_writes_records_and_provenance_sidecar(tmp_path, monkeypatch):
    """The evaluation job as on an offline compute node: network cut (`unshare -n` where permitted), empty HF
    cache; it evaluates the local checkpoint."""
    from ctpo.agent import template_hash
    from ctpo.eval.__main__ import main

    policy = _tiny_policy(tmp_path / "policy")
    config = _run_config(tmp_path / "seed0.json")
    bench = _write_verl(tmp_path / "toy_arith.parquet", [_verl_row(q, a, i) for i, (q, a) in enumerate(QUESTIONS.items())])
    out = tmp_path / "results" / "step10" / "toy_arith.parquet"
    argv = ["--config", str(config), "--checkpoint", str(policy), "--benchmark", str(bench), "--step", "10",
            "--out", str(out), "--backend", "hf"]
    proc = subprocess.run([*_no_network(), sys.executable, "-m", "ctpo.eval", *argv], capture_output=True, text=True,
                          env=_offline_env(tmp_path), cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    recs = pd.read_parquet(out)
    assert list(recs.columns) == list(EVAL_COLUMNS)
    assert sorted(zip(recs.problem_id, recs.sample_index)) == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    assert (recs.response_length <= 20 * 2 + 2 * 32).all() and (recs.turns >= 1).all()
    side = json.loads(out.with_suffix(".json").read_text())
    for key in ("experiment", "run", "seed", "step", "benchmark", "label", "k", "n_problems", "avg_at_k",
                "pass_at_k", "ci95", "extraction_failure_rate", "provenance"):
        assert key in side, key
    assert (side["experiment"], side["run"], side["step"], side["benchmark"], side["label"]) == (
        "toy", "toy_ctpo", 10, "toy_arith", "toy")
    assert side["k"] == 2 and side["n_problems"] == 2
    assert side["avg_at_k"] == pytest.approx(recs.correct.mean())
    assert side["extraction_failure_rate"] == pytest.approx(recs.extraction_failed.mean())
    prov = side["provenance"]
    weights = (policy / "model.safetensors").read_bytes()
    expected_ckpt = hashlib.sha256(f"model.safetensors:{hashlib.sha256(weights).hexdigest()}\n".encode()).hexdigest()
    assert prov["checkpoint"] == str(policy) and prov["checkpoint_sha256"] == expected_ckpt
    assert prov["benchmark_sha256"] == hashlib.sha256(bench.read_bytes()).hexdigest()
    import importlib.metadata as md

    assert prov["backend"] == "hf" and prov["backend_version"] == md.version("transformers")
    assert prov["torch_version"].split("+")[0] == md.version("torch").split("+")[0]
    assert prov["tp_size"] == 1 and prov["dtype"] == "float32"
    assert prov["sampling"]["temperature"] == 0.7 and prov["sampling"]["top_p"] == 1.0
    assert prov["sampling"]["max_tokens"] == 20 and prov["sampling"]["max_turns"] == 2
    assert prov["prompt_template_hash"] == template_hash("toy_tir")
    assert prov["git_commit"] and len(prov["git_commit"]) == 40
    assert prov["sandbox_isolation"]
    from ctpo.config import config_hash

    assert prov["config_hash"] == config_hash(json.loads(config.read_text()))  # ties the result to its run config
    assert not runner.partial_path(out).exists()

    # the same evaluation in this process, killed after its first chunk (3 of 4 pairs) and rerun, draws
    # the same records as the uninterrupted subprocess (seeded per chunk, not per process or attempt)
    again = tmp_path / "again" / "toy_arith.parquet"
    real_draw, drawn = runner._draw, []

    def draw_then_die(pairs, seed, plan, rollout):
        if drawn:
            raise KeyboardInterrupt("simulated kill")
        drawn.append(pairs)
        return real_draw(pairs, seed, plan, rollout)

    monkeypatch.setattr(runner, "_draw", draw_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([*argv[:-4], "--out", str(again), "--backend", "hf"])
    assert len(pd.read_parquet(runner.partial_path(again))) == 3 and not again.exists()
    monkeypatch.setattr(runner, "_draw", lambda pairs, *a: drawn.append(pairs) or real_draw(pairs, *a))
    assert main([*argv[:-4], "--out", str(again), "--backend", "hf"]) == 0
    assert drawn[1] == [(1, 1)]  # only the unfinished chunk was drawn again
    pd.testing.assert_frame_equal(pd.read_parquet(again), recs)


def test_eval_job_with_a_missing_model_fails_at_once_in_one_line_offline(tmp_path):
    """A checkpoint that is not on disk, or the base model not fetched at model.revision, stops the evaluation
    job at once (network cut, hubs offline) with one `error:` line and exit code 2."""
    import time

    from ctpo.config import load_experiment, resolve_run

    paper = resolve_run(load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml"), "qwen3_4b_ctpo", 0)
    (tmp_path / "paper.json").write_text(json.dumps(paper))
    bench = _write_verl(tmp_path / "aime25.parquet", [_verl_row("Add 2 and 3.", "5", 0)])
    missing = tmp_path / "runs" / "missing" / "hf" / "step20"
    want = {
        str(missing): f"error: model directory {missing} does not exist",
        "Qwen/Qwen3-4B": f"error: model Qwen/Qwen3-4B at revision {paper['model']['revision']} is not in the local HF "
                         f"cache ({tmp_path / 'hf' / 'hub'}) and this job runs offline",
    }
    for checkpoint, line in want.items():
        out = tmp_path / "out" / "aime25.parquet"
        t0 = time.monotonic()
        argv = ["--config", str(tmp_path / "paper.json"), "--checkpoint", checkpoint, "--benchmark", str(bench),
                "--step", "20", "--out", str(out)]
        proc = subprocess.run([*_no_network(), sys.executable, "-m", "ctpo.eval", *argv],
                              capture_output=True, text=True, env=_offline_env(tmp_path), cwd=REPO_ROOT, timeout=600)
        secs = time.monotonic() - t0
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert proc.returncode == 78 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(errors) == 1 and errors[0].startswith(line), errors
        assert not (tmp_path / "out").exists()
        print(f"{checkpoint}: one-line error after {secs:.1f} s")


def test_backend_choice_on_cpu():
    from ctpo.eval.backend import resolve_backend

    assert resolve_backend("auto") == "hf"
    with pytest.raises(ValueError, match="--backend vllm"):
        resolve_backend("vllm")
    with pytest.raises(ValueError, match="--backend must be one of"):
        resolve_backend("tpu")
