"""W&B never goes dark: an unreachable server or a bad key falls back to offline within seconds, said once;
the logged config is the run's own; evaluations are curves over train_step. Never the real internet."""
from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest
from hang import HANG_S

from ctpo import tracking
from ctpo.config import load_experiment, resolve_run, REPO_ROOT


class _Server:
    """A local stand-in for the W&B API: `answer` is 'ok', 'bad_key' or 'hang' (accept, never reply)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        if answer == "hang":
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)
            self.port = self.sock.getsockname()[1]
            return
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.answer == "bad_key":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"data": {"viewer": {"id": "VXNlcjox"}}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.answer == "hang":
            self.sock.close()
        else:
            self.httpd.shutdown()


@pytest.fixture
def online_env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HOME", str(tmp_path))
    servers = []

    def use(answer: str | None) -> None:
        if answer is None:  # nothing listens on this port
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
        else:
            servers.append(_Server(answer))
            port = servers[-1].port
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")

    yield use
    for s in servers:
        s.close()


def _cfg(run: str = "toy_ctpo") -> dict:
    return resolve_run(load_experiment(REPO_ROOT / "configs" / "experiments" / "toy.yaml"), run, 0)


def test_probe_accepts_a_server_that_knows_the_key(online_env):
    online_env("ok")
    assert tracking.probe_online(HANG_S) is None  # the answer comes at once; the timeout only bounds a hang
    assert tracking.usable_mode("auto", HANG_S) == ("online", None)


@pytest.mark.parametrize("answer, reason", [(None, "unreachable"), ("bad_key", "rejected (HTTP 401)")])
def test_an_unusable_server_is_named_and_online_is_given_up(online_env, answer, reason):
    """A refused connection or a rejected key is an answer: the reason says which (a generous timeout, so a
    loaded machine can never turn the answer into 'did not answer')."""
    online_env(answer)
    mode, why = tracking.usable_mode("auto", timeout_s=HANG_S)
    assert mode == "offline" and reason in why


def test_a_server_that_never_answers_is_given_up_after_the_timeout(online_env):
    """The 'hang' server accepts no connection, ever: that the probe returns at all shows its bound (the
    request thread is abandoned after `timeout_s`); the seconds it takes are measured in the README, not here."""
    online_env("hang")
    mode, why = tracking.usable_mode("auto", timeout_s=1.0)
    # the thread's join and the request's own socket timeout are both 1 s: either may end it first
    assert mode == "offline" and ("did not answer within 1 s" in why or "unreachable (timed out)" in why), why


def test_training_tracker_logs_offline_and_says_so_once(online_env, tmp_path, monkeypatch, capsys):
    online_env("hang")  # a firewall that drops packets: the worst case
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 1.0)
    t = tracking.start_tracking(_cfg(), tmp_path / "w")
    assert t.mode == "offline" and t.run is not None
    t.log({"train/reward_mean": 0.5}, step=1)
    run_dir = t.run_dir
    t.finish()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "wandb:" in line]
    assert len(lines) == 1 and "logging offline to" in lines[0] and "wandb sync" in lines[0], err
    assert run_dir.parent == tmp_path / "w" / "wandb" and list(run_dir.glob("run-*.wandb"))


def test_logged_config_holds_only_what_applies():
    ctpo = tracking.run_config_for_wandb(_cfg("toy_ctpo"))
    assert set(ctpo["loss"]) == {"method", "loss_agg_mode", "eps_low", "eps_high", "power", "dual_clip_c"}
    grpo = tracking.run_config_for_wandb(_cfg("toy_grpo"))
    assert set(grpo["loss"]) == {"method", "loss_agg_mode", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c"}
    assert ctpo["model"]["hidden_size"] == 64  # the toy's shape is its real shape


def test_hub_model_logs_its_own_shape_not_the_toy_default(tmp_path):
    paper = load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml")
    cfg = resolve_run(paper, "qwen3_14b_ctpo", 0)
    model_dir = tmp_path / "Qwen3-14B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"num_hidden_layers": 40, "hidden_size": 5120,
                                                       "num_attention_heads": 40, "vocab_size": 151936}))
    cfg["model"]["path"] = str(model_dir)
    logged = tracking.run_config_for_wandb(cfg)
    assert "hidden_size" not in logged["model"] and "clip_ratio_low" not in logged["loss"]
    assert logged["model"]["shape"] == {"num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40,
                                       "vocab_size": 151936}


def test_groups_separate_model_sizes():
    paper = load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml")
    groups = {r: tracking.wandb_group(resolve_run(paper, r, 0)) for r in ("qwen3_4b_ctpo", "qwen3_14b_ctpo")}
    assert groups == {"qwen3_4b_ctpo": "paper/Qwen3-4B/ctpo", "qwen3_14b_ctpo": "paper/Qwen3-14B/ctpo"}


def test_verl_job_env_goes_offline_when_the_server_is_unreachable(online_env, tmp_path, capsys):
    from ctpo.config import load_run_config
    from ctpo.train import verl_backend as vb
    from ctpo.train.verl_command import verl_command

    online_env(None)
    paper = load_experiment(REPO_ROOT / "configs" / "experiments" / "paper.yaml")
    cfg = load_run_config(resolve_run(paper, "qwen3_4b_ctpo", 0))
    _, env = verl_command(cfg, tmp_path / "w", vb.launch_state(cfg, tmp_path / "w"))
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str((tmp_path / "w").resolve())
    assert capsys.readouterr().err.count("wandb: online logging unavailable") == 1
