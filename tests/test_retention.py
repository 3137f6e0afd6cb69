"""Checkpoints that fit (issue 19, item 6): verl's driver prunes after every save, keeping the latest whole (resume)
and the model of each evaluated step (the merge), deleting the rest; the DAG hands each run its evaluated steps (tests/test_cluster_dag.py)."""
from __future__ import annotations

from omegaconf import OmegaConf

from ctpo.train import retention

W = 2  # FSDP world size of the synthetic checkpoints
SIZES = {"model": 400, "optim": 800, "extra": 8}  # bytes per rank: fp32 weights, AdamW state, RNG + scheduler


def save(root, step):
    """What verl 0.9.1's FSDPCheckpointManager + trainer write for one step (names from its source)."""
    actor = root / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")
    (actor / "fsdp_config.json").write_text("{}")
    for rank in range(W):
        for kind, name in (("model", "model"), ("optim", "optim"), ("extra", "extra_state")):
            (actor / f"{name}_world_size_{W}_rank_{rank}.pt").write_bytes(b"x" * SIZES[kind])
    (root / f"global_step_{step}" / "data.pt").write_bytes(b"d" * 16)
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def files(root, step):
    d = root / f"global_step_{step}"
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.is_dir() else None


def test_hook_prunes_after_every_save_as_verl_calls_it(tmp_path, monkeypatch):
    from ctpo.train.verl_save_hook import SaveOnRequest

    root = tmp_path / "checkpoints"
    monkeypatch.delenv("CTPO_SAVE_REQUEST", raising=False)
    monkeypatch.setenv(retention.ENV_KEEP, "20,40,50")
    hook = SaveOnRequest(OmegaConf.create({"trainer": {"default_local_dir": str(root), "save_freq": 10}}))
    for step in (10, 20, 30):
        save(root, step)
        hook.on_save(trainer=None, global_step=step, checkpoint_dir=str(root / f"global_step_{step}"))
    files_of_full = len(files(root, 30))
    assert files(root, 10) is None  # not evaluated, not the latest: gone
    model_only = files(root, 20)
    assert model_only == sorted(["actor/fsdp_config.json", "actor/huggingface/config.json", "data.pt"]
                                + [f"actor/model_world_size_{W}_rank_{r}.pt" for r in range(W)])
    assert files_of_full == len(model_only) + 2 * W  # the latest keeps optimizer and extra state for resume
    # a resumed run: a new process (verl forgot what it saved before), an orphan from before the restart
    save(root, 35)  # e.g. a save on request before preemption, never evaluated
    hook2 = SaveOnRequest(OmegaConf.create({"trainer": {"default_local_dir": str(root), "save_freq": 10}}))
    save(root, 40)
    hook2.on_save(trainer=None, global_step=40, checkpoint_dir=str(root / "global_step_40"))
    assert files(root, 30) is None and files(root, 35) is None and files(root, 20) == model_only
    assert len(files(root, 40)) == files_of_full


def test_prune_counts_what_it_freed_and_leaves_later_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        save(root, step)
    (root / "global_step_20" / "actor").mkdir(parents=True)  # an interrupted later save: not ours to judge
    out = retention.prune(root, latest=15, keep={10})
    per_step = W * sum(SIZES.values()) + 2 + 2 + 16  # shards, two json files, data.pt
    assert out["deleted"] == [5] and out["slimmed"] == [10]
    assert out["freed_bytes"] == per_step + W * (SIZES["optim"] + SIZES["extra"])
    assert (root / "global_step_20" / "actor").is_dir() and files(root, 15) is not None
    assert retention.prune(root, latest=15, keep={10}) == {"deleted": [], "slimmed": [], "freed_bytes": 0}
    assert retention.keep_from_env({}) is None and retention.keep_from_env({retention.ENV_KEEP: ""}) == set()
