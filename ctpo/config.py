"""Typed run configuration. Every key exists here once; YAML in `configs/` sets it. A default exists once
too: keys that change a result and that the paper fixes (`train.*` batch sizes, optimiser, schedule, rollout
IS; every verl setting, `train.verl`) have none here, so each experiment file states them (paper.yaml: the
paper's values) and a missing one fails naming the key; the others default here. The loss knobs' values
exist only in the method files, `configs/methods/<method>.yaml` (the methods themselves: `ctpo.methods`).

An experiment file (`configs/experiments/<name>.yaml`, also the Snakemake config) names runs as
(model, method) pairs. `resolve_run(experiment, run, seed)` merges, in order,

    RunConfig defaults  <-  experiment.defaults  <-  configs/models/<model>.yaml
                        <-  configs/methods/<method>.yaml  <-  experiment.runs.<run>.overrides

onto `OmegaConf.structured(RunConfig)`, so an unknown or mistyped key fails loudly, naming the file.
The result is a plain, canonically serialised dict (`canonical_json`) that Snakemake can pass as a
param and `ctpo` entry points read back with `load_run_config`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctpo import grading, methods

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"  # the experiment schema; $defs shared here

# rollout.protocol (RolloutConfig, docs/TOOL_PROTOCOL.md) -> (its entry in configs/verl/agent_loop.yaml, its verl
# tool config under configs/): what a verl run of that protocol reads at run time (`run_files`, ctpo.agent.protocols)
PROTOCOLS = {"ctpo_tir": ("ctpo_tir", "verl/tool_config.yaml"), "release": ("ctpo_release", "verl/release_tool_config.yaml")}
AGENT_LOOPS = "verl/agent_loop.yaml"  # under configs/: every agent loop entry; a verl run gets a copy
TIR_TEMPLATES = "tir"  # configs/tir/<rollout.template>.yaml: the ctpo_tir protocol's system prompt and chat format
BACKENDS = ("local", "verl")
VERL_DEVICES = ("gpu", "cpu")  # train.verl_device
VERL_CPU_ROLLOUTS = ("hf", "vllm")  # train.verl_cpu_rollout; the first is the default (gpu runs: always vLLM)
ROLLOUT_IS_MODES = (None, "sequence", "token")  # train.rollout_is
# The `cpu` device profile (ctpo.train.verl_cpu) runs these train.verl values only (a CPU has no flash-attn varlen
# kernels and nothing to offload to); the experiment states them (configs/experiments/toy_verl.yaml).
CPU_PROFILE_VERL = {"use_remove_padding": False, "gradient_checkpointing": False, "param_offload": False,
                    "optimizer_offload": False}
CPU_VLLM_BUCKET_MB = 64  # verl_cpu_rollout vllm: the weight-sync bucket is a /dev/shm segment on CPU (no CUDA IPC)


class ConfigError(ValueError):
    """A bad config: the message names the file / key and what was expected."""


# The policy loss (paper Sec. 2-3): `method` (one of `ctpo.methods`), the aggregation, and one nullable field per
# loss knob of `ctpo.methods.KNOBS` (declared there once, with its type and meaning). The knob values are in the
# method file, configs/methods/<method>.yaml, and only there: a knob another method reads stays null
# (`ctpo.methods.check_loss`).
LossConfig = make_dataclass("LossConfig", [
    # a registered method (ctpo.methods); null: no policy loss (the SFT warm start)
    ("method", Optional[str], field(default=MISSING)),
    # seq-mean-token-mean: mean over responses of each response's token mean (the release's effective objective, the
    # paper's 1/|o_i|); token-mean: over all tokens of the mini-batch (verl 0.9.1's, not the release's); seq-mean-token-sum
    ("loss_agg_mode", Optional[str], field(default=MISSING)),
    *((k.name, Optional[k.type], field(default=None)) for k in methods.KNOBS.values()),
])
LossConfig.__module__ = __name__
LossConfig.__doc__ = "The policy loss: method, loss_agg_mode and the knobs of ctpo.methods.KNOBS (null = unset)."


@dataclass
class ModelConfig:
    """The policy. `kind: toy` builds a tiny Qwen3-architecture model locally (no hub)."""

    name: str = MISSING
    kind: str = "toy"  # toy | hf
    path: str = ""  # hf: hub id or local dir (e.g. Qwen/Qwen3-4B); toy: unused
    # hf hub id: the commit to fetch (`prepare_model`) and to require on offline nodes (ctpo.hub.require_model);
    # None = unpinned (whatever the cache holds). A local-directory path takes no revision.
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16
    # toy architecture (transformers Qwen3Config fields)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 1024
    context_length: int = 1024  # prompt + response tokens must fit; checked before a run starts


@dataclass
class RolloutConfig:
    """Tool-integrated reasoning rollouts (SimpleTIR style, paper Sec. 4.1)."""

    n: int = 8  # responses per prompt (group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 5  # assistant turns
    max_prompt_tokens: int = 16000
    max_response_tokens: int = 8000  # whole trajectory, observations included
    max_obs_tokens: int = 256  # per observation
    obs_max_chars: int = 512  # SimpleTIR truncation of the tool output
    sandbox_timeout_s: float = 10.0
    sandbox_concurrency: int = 8
    max_num_seqs: int = 1024  # vLLM concurrent sequences per engine (the release: 1024; verl 0.9.1's default 256)
    void_turn_masking: bool = False  # SimpleTIR: mask trajectories with a turn holding neither code nor answer
    enable_thinking: bool = False
    template: str = "qwen3_tir"  # configs/tir/<template>.yaml: system prompt and chat format
    # tool protocol (docs/TOOL_PROTOCOL.md): "ctpo_tir" = our code-fence loop with inline observations
    # (the toy); "release" = the authors' release: verl's tool_agent loop, Hermes tool calls with a
    # fenced-code fallback, `tool` messages, the code_interpreter tool of configs/verl/release_tool_config.yaml
    protocol: str = "ctpo_tir"


@dataclass
class SFTConfig:
    """Toy warm start: a short SFT on generated tool-use demonstrations (local backend only)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    n_demos: int = 4000
    # imperfect teacher: each digit of a demonstration's boxed answer is replaced by another digit with
    # this probability, so the warm start makes copy errors at a known rate (sets its starting accuracy)
    answer_digit_noise: float = 0.0
    # [lo, hi]: the held-out accuracy a warm start must land in; outside it the warm start fails (exit 78,
    # naming the seed and the accuracy) instead of handing RL a policy that cannot earn a reward. [0, 1]: any.
    accuracy_band: List[float] = field(default_factory=lambda: [0.0, 1.0])


@dataclass
class VerlConfig:
    """Every setting the verl launcher (ctpo.train.verl_backend) passes to verl that is not derived from
    another key. No defaults here: an experiment using train.backend verl states them all (the release's
    values are in configs/experiments/paper.yaml), so each is hashed into the run identity, printed by
    --print-command, and a change reruns the job. The `cpu` device profile (ctpo.train.verl_cpu) needs some of
    them at given values (CPU_PROFILE_VERL): a config stating others fails, naming the key."""

    ppo_epochs: int = MISSING  # actor.ppo_epochs: passes over each rollout batch
    lr_scheduler: str = MISSING  # actor.optim.lr_scheduler_type: constant | cosine
    lr_warmup_steps_ratio: float = MISSING  # actor.optim.lr_warmup_steps_ratio (of total steps)
    kl_loss_coef: float = MISSING  # actor.kl_loss_coef; > 0 turns on actor.use_kl_loss (and a reference model)
    entropy_coeff: float = MISSING  # actor.entropy_coeff
    param_offload: bool = MISSING  # actor.fsdp_config.param_offload
    optimizer_offload: bool = MISSING  # actor.fsdp_config.optimizer_offload
    use_remove_padding: bool = MISSING  # model.use_remove_padding (flash-attn varlen kernels)
    gradient_checkpointing: bool = MISSING  # model.enable_gradient_checkpointing
    rollout_tp: int = MISSING  # rollout.tensor_model_parallel_size (vLLM tensor parallel per replica)
    gpu_memory_utilization: float = MISSING  # rollout.gpu_memory_utilization (vLLM weights + KV-cache share)
    weight_sync_bucket_mb: int = MISSING  # rollout.checkpoint_engine.update_weights_bucket_megabytes
    filter_overlong_prompts: bool = MISSING  # data.filter_overlong_prompts (drop prompts > max_prompt_tokens)
    truncation: str = MISSING  # data.truncation: error | left | right | middle
    val_before_train: bool = MISSING  # trainer.val_before_train


@dataclass
class TrainConfig:
    """RL schedule. Batch sizes count prompts, as verl's `data.train_batch_size` and `ppo_mini_batch_size`.
    Keys that change results have no default here: each experiment file states them (paper.yaml: the paper's)."""

    backend: str = "local"  # local (CPU toy) | verl (GPU)
    prompts_per_step: int = MISSING
    mini_batch_prompts: int = MISSING  # optimizer steps per rollout batch = prompts_per_step / mini_batch_prompts
    micro_batch_size_per_gpu: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    total_steps: int = MISSING
    save_freq: int = MISSING
    test_freq: int = MISSING
    dump_steps: List[int] = MISSING
    norm_adv_by_std: bool = MISSING  # GRPO: (R - mean) / std; False: mean-centred only
    rollout_is: Optional[str] = MISSING  # rollout-vs-trainer IS correction (verl rollout_correction); null = off
    rollout_is_threshold: float = MISSING
    n_gpus: int = 1
    n_nodes: int = 1
    # verl backend only: gpu (the paper run) | cpu (ctpo.train.verl_cpu: verl's own trainer on a CPU-only
    # machine, n_gpus logical devices; the toy DAG's `toy_verl` experiment and config debugging)
    verl_device: str = "gpu"
    # the rollout engine of the `cpu` device profile: hf (a transformers-generate server) | vllm (vLLM's own
    # CPU build, the paper run's engine; needs the vLLM test environment, `make venv-vllm`). The gpu run
    # always uses vLLM, so any other value with verl_device gpu is an error.
    verl_cpu_rollout: str = "hf"
    verl: Optional[VerlConfig] = None  # required for backend verl (see VerlConfig)


@dataclass
class DataConfig:
    train: str = MISSING  # parquet in verl's schema
    val: List[str] = field(default_factory=list)  # validation parquet files used during training


@dataclass
class EvalConfig:
    """avg@k evaluation. Paper: k = 32 (Table 2, avg@32); the release: T = 0.7 (ctpo.sh VAL_TEMPERATURE), top_p = 1.0
    (the fork's val_kwargs default). docs/PAPER_SETTINGS.md lists every setting and its source."""

    k: int = 32
    temperature: float = 0.7
    top_p: float = 1.0
    max_problems: Optional[int] = None  # cap per benchmark (toy / smoke runs); None = all
    tp_size: int = 1
    chunk_size: int = 256  # (problem, sample) pairs per batched agent-loop call; the resume unit; part of the seeding


@dataclass
class RewardConfig:
    """How responses are graded, for the training reward and for avg@k (ctpo.grading)."""

    # release: the authors' release grader (ctpo.release_reward; the paper experiment); strict: ours (ctpo.reward).
    # Evaluation records both verdicts; this one is `correct` and the tables' numbers.
    grader: str = "strict"


@dataclass
class WandbConfig:
    project: str = "ctpo-repro"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online when a key is configured, else offline) | online | offline | disabled


@dataclass
class RunConfig:
    """Everything one training run (one method, one model, one seed) needs."""

    experiment: str = MISSING
    run: str = MISSING
    seed: int = 0
    label: str = "toy"  # toy | paper: toy-scale results are labelled toy everywhere
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Not set by any file: `resolve_run` fills it. What the run reads from configs/ while it runs besides this
    # config (`run_files`: the TIR template, the verl agent loop entry and tool config), path -> sha256, so an
    # edit there changes the resolved config and the run identity, and Snakemake reruns what reads it.
    files: Dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def literal(data: Any) -> Any:
    """`data` (plain containers) with OmegaConf's interpolation escaped in every string, so that resolving
    gives the text back: `${x}` -> `\\${x}`, and backslashes right before it doubled (OmegaConf's rule)."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=False)
    if isinstance(data, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", data)
    if isinstance(data, dict):
        return {k: literal(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [literal(v) for v in data]
    return data


def hydra_quote(text: str, resolves: int = 1) -> str:
    """`text` as one Hydra override value that the consumer reads back as exactly `text`: OmegaConf
    interpolation escaped once per resolution on the way (`literal`), then single-quoted for Hydra's override
    grammar, where only backslashes right before a quote (or the closing quote) are escape characters.
    `resolves`: in-place `OmegaConf.resolve` calls before the value is read; verl's main_ppo makes one
    (TaskRunner.run), after which each read resolves again, so `${x}` must survive two resolutions there.
    Commas, '=', spaces, brackets, quotes and `${oc.env:HF_TOKEN}` stay text."""
    body = str(text)
    for _ in range(resolves + 1):
        body = literal(body)
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", body)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return "'" + body + "'"


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, literal(update))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad key '{key}': {e.msg if hasattr(e, 'msg') else e}".splitlines()[0]) from None


def load_experiment(path: str | Path) -> dict:
    """The experiment file as a plain dict (also what Snakemake's `configfile` holds)."""
    return OmegaConf.to_container(_load_yaml(Path(path)), resolve=False)  # values are data: no interpolation


def resolve_run(experiment: dict, run: str, seed: int, config_dir: Path = CONFIG_DIR) -> dict:
    """Resolve one run's config from an experiment dict; returns a plain dict of RunConfig."""
    runs = experiment.get("runs") or {}
    if run not in runs:
        raise ConfigError(f"experiment '{experiment.get('experiment')}': unknown run '{run}' (have: {sorted(runs)})")
    spec = runs[run]
    for key in ("model", "method"):
        if key not in spec:
            raise ConfigError(f"experiment runs.{run}: missing key '{key}'")
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, experiment.get("defaults") or {}, "experiment.defaults")
    model_file = config_dir / "models" / f"{spec['model']}.yaml"
    cfg = _merge(cfg, {"model": _load_yaml(model_file)}, str(model_file))
    method_file = config_dir / "methods" / f"{spec['method']}.yaml"
    cfg = _merge(cfg, {"loss": _load_yaml(method_file)}, str(method_file))
    cfg = _merge(cfg, spec.get("overrides") or {}, f"experiment runs.{run}.overrides")
    cfg = _merge(
        cfg,
        {"experiment": experiment["experiment"], "run": run, "seed": int(seed), "label": experiment.get("label", "toy")},
        "experiment",
    )
    if "wandb" in experiment:
        cfg = _merge(cfg, {"wandb": experiment["wandb"]}, "experiment.wandb")
    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if out["files"]:
        raise ConfigError(f"experiment runs.{run}: files: computed from configs/ (ctpo.config.run_files), not set")
    validate_run_config(out)
    out["files"] = run_files(out, config_dir)
    return out


def _file_hash(key: str, config_dir: Path) -> str:
    """sha256 of `configs/<path>`, or of the canonical JSON of the entry `<name>` in `configs/<path>#<name>` (a
    list of named entries: configs/verl/agent_loop.yaml). A missing file or entry is a ConfigError naming it."""
    rel, _, entry = key.removeprefix(f"{CONFIG_DIR.name}/").partition("#")
    path = config_dir / rel
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a run with this config reads it while it runs)")
    if not entry:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    items = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    found = [e for e in items if isinstance(e, dict) and e.get("name") == entry] if isinstance(items, list) else []
    if len(found) != 1:
        raise ConfigError(f"{path}: expected a list holding one entry named '{entry}'")
    return hashlib.sha256(canonical_json(found[0]).encode()).hexdigest()


def template_file(template: str, config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """{configs/tir/<template>.yaml: sha256}: the TIR template's system prompt and chat format (`run_files`; the
    toy warm start reads only this)."""
    key = f"{CONFIG_DIR.name}/{TIR_TEMPLATES}/{template}.yaml"
    return {key: _file_hash(key, config_dir)}


def run_files(cfg: dict, config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """{path under the repository: sha256} of what a run reads from configs/ at run time, besides its resolved
    config: the ctpo_tir protocol's template (configs/tir/<rollout.template>.yaml; local and verl trainers,
    evaluation), and for train.backend verl its protocol's agent loop entry and tool config file (`PROTOCOLS`)."""
    rollout = cfg["rollout"]
    out = template_file(rollout["template"], config_dir) if rollout["protocol"] == "ctpo_tir" else {}
    if cfg["train"]["backend"] == "verl":
        entry, tools = PROTOCOLS[rollout["protocol"]]
        for key in (f"{CONFIG_DIR.name}/{AGENT_LOOPS}#{entry}", f"{CONFIG_DIR.name}/{tools}"):
            out[key] = _file_hash(key, config_dir)
    return out


def load_run_config(path_or_dict: str | Path | dict) -> RunConfig:
    """A resolved run config (file or dict) as a typed, read-only RunConfig object."""
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, "run config"
    else:
        p = Path(path_or_dict)
        source = str(p)
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            data = OmegaConf.to_container(_load_yaml(p), resolve=False)
    cfg = _merge(OmegaConf.structured(RunConfig), data, source)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    validate_run_config(plain, source)
    changed = sorted(k for k, h in plain["files"].items() if _file_hash(k, CONFIG_DIR) != h)
    if changed:  # the run would read other text than its identity says
        raise ConfigError(f"{source}: files: {', '.join(changed)} changed since this run config was resolved; "
                          "resolve it again (Snakemake reruns its run_config job)")
    return OmegaConf.to_object(cfg)


def method_loss(method: str, config_dir: Path = CONFIG_DIR, **overrides) -> LossConfig:
    """The loss of configs/methods/<method>.yaml (plus `overrides`), checked against the method's entry."""
    path = config_dir / "methods" / f"{method}.yaml"
    cfg = _merge(_merge(OmegaConf.structured(LossConfig), _load_yaml(path), str(path)), overrides, "overrides")
    out = OmegaConf.to_object(cfg)
    try:
        methods.check_loss(out)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


def experiment_grader(experiment: dict) -> str:
    """reward.grader an experiment's defaults set (RewardConfig's default when they set none)."""
    return ((experiment.get("defaults") or {}).get("reward") or {}).get("grader", RewardConfig.grader)


def missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted names of the keys left at MISSING ('???') in a resolved config dict."""
    if isinstance(cfg, dict):
        return [k for key, v in cfg.items() for k in missing_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if cfg == "???" else []


def validate_run_config(cfg: dict, source: str = "run config") -> None:
    """Every check that spans keys, once (the schema checks the experiment file's names and patterns, the
    dataclasses the types); raises ConfigError naming the key and what was expected."""
    loss, train, rollout, model = cfg["loss"], cfg["train"], cfg["rollout"], cfg["model"]

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    if train["backend"] not in BACKENDS:
        raise bad(f"train.backend must be one of {BACKENDS}, got '{train['backend']}'")
    if train["backend"] == "verl" and train.get("verl") is None:
        raise bad("train.verl (the verl launcher's settings, ctpo.config.VerlConfig) is required for train.backend "
                  "verl; configs/experiments/paper.yaml has the release's values")
    missing = [k for k in missing_keys(cfg) if not k.startswith("loss.")]  # loss: ctpo.methods.check_loss
    if missing:
        raise bad(f"{', '.join(missing)}: required, no default (set in the experiment file's defaults; "
                  f"configs/experiments/paper.yaml has the paper's values)")
    try:
        methods.check_loss(loss, allow_none=True)
    except ValueError as e:
        raise bad(str(e)) from None
    for key in ("total_steps", "save_freq", "test_freq", "prompts_per_step", "mini_batch_prompts",
                "micro_batch_size_per_gpu", "n_gpus", "n_nodes"):
        if train[key] < 1:
            raise bad(f"train.{key} must be >= 1, got {train[key]}")
    if train["prompts_per_step"] % train["mini_batch_prompts"] != 0:
        raise bad(f"train.prompts_per_step ({train['prompts_per_step']}) must be divisible by train.mini_batch_prompts "
                  f"({train['mini_batch_prompts']})")
    outside = [s for s in train["dump_steps"] if not 1 <= s <= train["total_steps"]]
    if outside:
        raise bad(f"train.dump_steps {outside} outside [1, train.total_steps={train['total_steps']}]")
    if train["rollout_is"] not in ROLLOUT_IS_MODES:
        raise bad(f"train.rollout_is must be one of {ROLLOUT_IS_MODES}, got '{train['rollout_is']}'")
    if train["rollout_is"] is not None and train["rollout_is_threshold"] <= 1.0:
        raise bad(f"train.rollout_is_threshold must be > 1, got {train['rollout_is_threshold']}")
    if rollout["n"] < 2:
        raise bad(f"rollout.n must be >= 2 for group-relative advantages, got {rollout['n']}")
    if cfg["eval"]["k"] < 1:
        raise bad(f"eval.k must be >= 1, got {cfg['eval']['k']}")
    if cfg.get("reward", {}).get("grader") not in grading.GRADERS:
        raise bad(f"reward.grader must be one of {grading.GRADERS}, got {cfg.get('reward', {}).get('grader')!r}")
    if rollout["protocol"] not in PROTOCOLS:
        raise bad(f"rollout.protocol must be one of {tuple(PROTOCOLS)}, got '{rollout['protocol']}'")
    if rollout["protocol"] == "release" and train["backend"] != "verl":
        raise bad("rollout.protocol 'release' (chat messages through a Hugging Face chat template) needs "
                  "train.backend 'verl'; the local toy backend uses rollout.protocol 'ctpo_tir'")
    revision = model["revision"]
    if revision is not None and not re.search(_revision_pattern(), str(revision)):
        raise bad(f"model.revision: {revision!r} is not a hub revision (commit hash, tag or branch: letters, digits, "
                  f"'_', '-', '.' and '/', no '..'; {SCHEMA.name} $defs.revision)")
    band = cfg["sft"]["accuracy_band"]
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        raise bad(f"sft.accuracy_band must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(band)}")
    total = rollout["max_prompt_tokens"] + rollout["max_response_tokens"]
    if total > model["context_length"]:
        raise bad(f"rollout.max_prompt_tokens + rollout.max_response_tokens = {total} exceeds model.context_length "
                  f"({model['context_length']})")
    if train["backend"] == "verl":
        _validate_verl(cfg, bad)


def _validate_verl(cfg: dict, bad) -> None:
    """The cross-key checks of train.backend verl: the device profile, the data and policy verl needs, and a
    batch that splits evenly over the GPUs (ctpo.verl_plugin counts loss calls per step from it)."""
    train, rollout, verl = cfg["train"], cfg["rollout"], cfg["train"]["verl"]
    dev, engine = train["verl_device"], train["verl_cpu_rollout"]
    if dev not in VERL_DEVICES:
        raise bad(f"train.verl_device: expected one of {VERL_DEVICES}, got '{dev}'")
    if engine not in VERL_CPU_ROLLOUTS:
        raise bad(f"train.verl_cpu_rollout: expected one of {VERL_CPU_ROLLOUTS}, got '{engine}'")
    if dev == "gpu" and engine != VERL_CPU_ROLLOUTS[0]:
        raise bad(f"train.verl_cpu_rollout '{engine}' applies to train.verl_device cpu only (the gpu run always "
                  "uses vLLM)")
    if dev == "cpu":
        for key, want in CPU_PROFILE_VERL.items():
            if verl[key] != want:
                raise bad(f"train.verl.{key}: the cpu device profile (train.verl_device cpu) needs "
                          f"{str(want).lower()}, got {str(verl[key]).lower()}")
        if engine == "vllm" and verl["weight_sync_bucket_mb"] > CPU_VLLM_BUCKET_MB:
            raise bad(f"train.verl.weight_sync_bucket_mb: the cpu device profile with train.verl_cpu_rollout vllm "
                      f"needs <= {CPU_VLLM_BUCKET_MB} (a /dev/shm segment on CPU), got {verl['weight_sync_bucket_mb']}")
    if cfg["model"]["kind"] == "hf" and not cfg["model"]["path"]:
        raise bad("model.path must name the policy (a hub id or a local dir) for model.kind hf")
    if not cfg["data"]["val"]:
        raise bad("data.val must name at least one validation parquet for train.backend verl")
    world = train["n_gpus"] * train["n_nodes"]
    responses = train["prompts_per_step"] * rollout["n"]
    if responses % (world * train["micro_batch_size_per_gpu"]) or (train["mini_batch_prompts"] * rollout["n"]) % world:
        raise bad(f"train.prompts_per_step * rollout.n ({responses}) and train.mini_batch_prompts * rollout.n must "
                  f"split evenly over {world} GPUs x train.micro_batch_size_per_gpu "
                  f"({train['micro_batch_size_per_gpu']})")


def check_experiment(experiment: dict, resolved: dict[tuple[str, int], dict]) -> None:
    """The experiment's cross-key checks: names in `evaluation:` and `diagnostics:` exist, Table 3 is a pair, the
    diagnostics steps are dumped by training. `resolved`: {(run, seed): resolved run config}."""
    runs = set(experiment["runs"])
    benchmarks = set(experiment["data"]["benchmarks"])
    ev = experiment["evaluation"]
    for key in ("table2_runs", "table3_runs", "figure2_runs"):
        for run in ev[key]:
            if run not in runs:
                raise ConfigError(f"experiment evaluation.{key}: unknown run '{run}' (have: {sorted(runs)})")
    if len(ev["table3_runs"]) != 2:  # Table 3 is the ablation pair; the tables job would fail after all training
        raise ConfigError(f"experiment evaluation.table3_runs: expected [adaptive_run, fixed_run], got {ev['table3_runs']}")
    for bench in list(ev["table2_benchmarks"]) + [ev["figure2_benchmark"]]:
        if bench not in benchmarks:
            raise ConfigError(f"experiment evaluation: benchmark '{bench}' is not in data.benchmarks ({sorted(benchmarks)})")
    diag = experiment["diagnostics"]
    if diag["run"] not in runs:
        raise ConfigError(f"experiment diagnostics.run: unknown run '{diag['run']}' (have: {sorted(runs)})")
    for seed in experiment["seeds"]:
        dumped = set(resolved[(diag["run"], int(seed))]["train"]["dump_steps"])
        missing = sorted(set(diag["steps"]) - dumped)
        if missing:
            raise ConfigError(f"experiment diagnostics.steps: steps {missing} are not in train.dump_steps "
                              f"{sorted(dumped)} of run '{diag['run']}'")


def _revision_pattern() -> str:
    """The schema's revision pattern (one definition for data.deepscaler.revision and model.revision)."""
    import yaml

    return yaml.safe_load(SCHEMA.read_text())["$defs"]["revision"]["pattern"]


def effective_batch_sizes(cfg: RunConfig) -> dict:
    """The batch arithmetic a user should see before anything starts (printed by the trainers)."""
    t, r = cfg.train, cfg.rollout
    return {
        "prompts_per_step": t.prompts_per_step,
        "responses_per_step": t.prompts_per_step * r.n,
        "mini_batch_prompts": t.mini_batch_prompts,
        "mini_batch_responses": t.mini_batch_prompts * r.n,
        "optimizer_steps_per_rollout": t.prompts_per_step // t.mini_batch_prompts,
    }


def canonical_json(cfg: dict) -> str:
    """Stable serialisation: sorted keys, no whitespace. Snakemake params use this (reruns on change)."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(canonical_json(cfg).encode()).hexdigest()[:16]
