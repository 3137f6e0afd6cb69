"""Weights & Biases tracking that is never required.

- project = `wandb.project`, group = "<experiment>/<model>/<method>" (local and verl runs), name = "<run>-seed<seed>";
- run id = a hash of (experiment, run, seed, run identity), stored at `<workdir>/wandb_run_id` beside the
  checkpoints and reused with resume="allow" (`wandb_run_id`, for both trainers), so a restarted or
  requeued run continues the same W&B run;
- mode "auto": online when a key is configured (WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai),
  else offline (an explicit WANDB_MODE in the environment wins); "online" | "offline" | "disabled" as given;
- online never goes dark: `usable_mode` first asks the W&B server who the key belongs to, bounded by
  PROBE_TIMEOUT_S (a compute node without network, a firewall that drops packets, a bad key). When that
  fails the run logs offline into `<workdir>/wandb/` and says so once, with the `wandb sync` line that
  uploads it later. If wandb.init itself fails online, it is retried offline the same way;
- if wandb is missing or cannot start even offline, a warning is printed and training goes on untracked;
- the logged config holds only what applies to the run (`run_config_for_wandb`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import netrc
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

from ctpo import methods
from ctpo.layout import WORKDIR_FILES

RUN_ID_FILE = WORKDIR_FILES["wandb_run_id"]  # in the run's workdir (ctpo.layout)
MODES = ("auto", "online", "offline", "disabled")
PROBE_TIMEOUT_S = 5.0  # how long a job may wait to learn that W&B is unreachable
DEFAULT_BASE_URL = "https://api.wandb.ai"

TOY_MODEL_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "max_position_embeddings")


def run_id_for(experiment: str, run: str, seed: int, identity: str = "") -> str:
    """Deterministic W&B run id: the same (experiment, run, seed, run identity) always maps to the same id.

    `identity` is `ctpo.workdir.run_identity(cfg)[0]`: a requeued job keeps its run, a run whose config
    changed (and is retrained from scratch) opens a new one."""
    key = f"{experiment}/{run}/seed{seed}" + (f"/{identity}" if identity else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def _api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        auth = netrc.netrc().authenticators(urlparse(_base_url()).hostname or "api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return auth[2] if auth else None


def _has_api_key() -> bool:
    return _api_key() is not None


def probe_online(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the W&B server answers and accepts the key within `timeout_s`, else the reason.

    The request runs in a daemon thread so that nothing (DNS included) can hold the job longer."""
    result: list[str | None] = []

    def ask() -> None:
        key = _api_key() or ""
        req = urllib.request.Request(
            _base_url() + "/graphql", data=json.dumps({"query": "query { viewer { id } }"}).encode(),
            headers={"Content-Type": "application/json",
                     "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                body = json.loads(r.read() or b"{}")
            ok = ((body.get("data") or {}).get("viewer") or {}).get("id")
            result.append(None if ok else "the server did not accept the API key")
        except urllib.error.HTTPError as e:
            result.append("the API key was rejected (HTTP %d)" % e.code if e.code in (401, 403) else f"HTTP {e.code}")
        except Exception as e:  # URLError, timeouts, DNS, TLS
            result.append(f"{_base_url()} unreachable ({getattr(e, 'reason', e)})")

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0] if result else f"{_base_url()} did not answer within {timeout_s:g} s"


def usable_mode(mode: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str, str | None]:
    """(the mode a job should use, why online was given up or None). Online is checked, never assumed."""
    resolved = resolve_mode(mode)
    if resolved != "online":
        return resolved, None
    reason = probe_online(timeout_s)
    return ("offline", reason) if reason else ("online", None)


def fallback_message(reason: str, seconds: float, wandb_dir: str | Path) -> str:
    """The one line a job prints when it logs offline instead of online."""
    return (f"wandb: online logging unavailable ({reason}; checked in {seconds:.1f} s); logging offline to "
            f"{wandb_dir}; upload later with `wandb sync {wandb_dir}/offline-run-*`")


def run_config_for_wandb(cfg_dict: dict) -> dict:
    """The resolved run config less what does not apply: other methods' loss knobs, and the toy
    architecture fields on a hub model (its shape is the hub config's; `model.shape` when known)."""
    import copy

    out = copy.deepcopy(cfg_dict)
    loss = out.get("loss", {})
    keep = methods.loss_keys(loss.get("method"))  # the method's knobs (ctpo.methods); other methods' are null
    out["loss"] = {k: v for k, v in loss.items() if k in keep}
    model = out.get("model", {})
    if model.get("kind") != "toy":
        out["model"] = {k: v for k, v in model.items() if k not in TOY_MODEL_KEYS}
        shape = hub_model_shape(model.get("path", ""))
        if shape:
            out["model"]["shape"] = shape
    return out


def hub_model_shape(path: str) -> dict:
    """Layers, hidden size, heads and vocabulary of a hub model from its config.json when it is on disk
    (a local directory, or the local HF cache after `prepare`); {} otherwise. Never downloads."""
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings")
    cfg_file = Path(path) / "config.json" if path else None
    if cfg_file is None or not cfg_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json") if path else None
            cfg_file = Path(hit) if isinstance(hit, str) else None
        except Exception:
            cfg_file = None
    if cfg_file is None or not cfg_file.is_file():
        return {}
    hub = json.loads(cfg_file.read_text())
    return {k: hub[k] for k in fields if k in hub}


def resolve_mode(mode: str) -> str:
    """The concrete wandb mode for a configured `wandb.mode`."""
    if mode not in MODES:
        raise ValueError(f"wandb.mode must be one of {MODES}, got '{mode}'")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if _has_api_key() else "offline"


class Tracker:
    """A W&B run, or nothing (`run is None`) when disabled or when wandb failed to start."""

    def __init__(self, run, run_id: str, mode: str) -> None:
        self.run = run
        self.run_id = run_id
        self.mode = mode

    @property
    def run_dir(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # never let tracking stop training
            warnings.warn(f"wandb: log failed at step {step}: {e}")

    def summarize(self, values: dict) -> None:
        """Set keys of the run's W&B summary (shown beside the run in the W&B UI and its offline files)."""
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:  # never let tracking stop training
            warnings.warn(f"wandb: summary update failed: {e}")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            warnings.warn(f"wandb: finish failed: {e}")
        self.run = None


def wandb_run_id(cfg_dict: dict, workdir: str | Path, store: bool = True) -> str:
    """The run's W&B id, the one both trainers use: read from `<workdir>/wandb_run_id`, else (absent or
    empty) derived from (experiment, run, seed, run identity) and stored there (unless `store` is false)."""
    from ctpo.io import write_text
    from ctpo.workdir import run_identity

    id_file = Path(workdir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        if run_id:
            return run_id
    run_id = run_id_for(cfg_dict["experiment"], cfg_dict["run"], cfg_dict["seed"], run_identity(cfg_dict)[0])
    if store:
        write_text(id_file, run_id + "\n")
    return run_id


def start_tracking(cfg_dict: dict, workdir: str | Path) -> Tracker:
    """Open (or resume) the W&B run of a resolved run config. `workdir` holds the id file and wandb/."""
    workdir = Path(workdir)
    run_id = wandb_run_id(cfg_dict, workdir)
    t0 = time.monotonic()
    mode, reason = usable_mode(cfg_dict["wandb"]["mode"])
    waited = time.monotonic() - t0
    if mode == "disabled":
        return Tracker(None, run_id, mode)
    try:
        import wandb
    except Exception as e:
        print(f"warning: wandb did not import ({type(e).__name__}: {e}); training continues untracked", file=sys.stderr)
        return Tracker(None, run_id, "failed")
    (workdir / "wandb").mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        project=cfg_dict["wandb"]["project"],
        entity=cfg_dict["wandb"]["entity"],
        group=wandb_group(cfg_dict),
        name=f"{cfg_dict['run']}-seed{cfg_dict['seed']}",
        id=run_id,
        resume="allow",
        dir=str(workdir),
        config=run_config_for_wandb(cfg_dict),
    )
    if mode == "online":
        try:
            run = wandb.init(mode="online", settings=wandb.Settings(silent=True, console="off",
                                                                     init_timeout=4 * PROBE_TIMEOUT_S), **kwargs)
            return Tracker(run, run_id, "online")
        except Exception as e:
            reason = f"wandb.init failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            mode, waited = "offline", time.monotonic() - t0
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(silent=True, console="off"), **kwargs)
    except Exception as e:
        print(f"warning: wandb did not start ({type(e).__name__}: {e}); training continues untracked", file=sys.stderr)
        return Tracker(None, run_id, "failed")
    if reason:
        print(fallback_message(reason, waited, workdir / "wandb"), file=sys.stderr, flush=True)
    return Tracker(run, run_id, mode)


def wandb_group(cfg_dict: dict) -> str:
    """`<experiment>/<model>/<method>`: model sizes never share a group (4B and 14B curves apart)."""
    return f"{cfg_dict['experiment']}/{cfg_dict['model']['name']}/{cfg_dict['loss']['method']}"
