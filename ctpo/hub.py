"""Hub files on offline compute nodes: fetched once where the network is, checked in seconds where it is not.

Compute nodes often have no internet. Jobs that run there (training, merge, evaluation) set the hubs
offline (`OFFLINE_ENV`) and call `require_model` first: a model that is not in the local HF cache (or a
local directory) stops the job with one line that says what to run, instead of a download that hangs
or a traceback deep inside verl; a snapshot of another commit than `model.revision` stops it the same way.
`python -m ctpo.hub fetch` is the login-node side (network): it puts a model, at a pinned revision, into
the cache (`HF_HOME`, or `--cache-dir`).

    python -m ctpo.hub fetch --model Qwen/Qwen3-4B [--revision <commit>] [--out marker.json]   (network)
    python -m ctpo.hub check --model Qwen/Qwen3-4B [--revision <commit>]   (anywhere, never the network)

`check` (and the GPU preflight, ctpo.preflight) also requires the snapshot to be complete (`incomplete`): config,
tokenizer, and every weight shard its index names.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class MissingLocalFiles(RuntimeError):
    """A hub file a compute job needs is not on disk; the message is the one line to print."""


def set_offline(env: dict | None = None) -> dict:
    """Put the hubs offline in `env` (default: this process's environment); returns it."""
    env = os.environ if env is None else env
    env.update(OFFLINE_ENV)
    return env


def is_local_path(path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, ./-relative, deeper than org/name, or
    existing."""
    return Path(path).is_absolute() or path.startswith(".") or path.count("/") > 1 or Path(path).exists()


def cached_revisions(path: str) -> list[str]:
    """Commits of hub model `path` that have a snapshot in the local HF cache (sorted)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snaps = Path(HF_HUB_CACHE) / f"models--{path.replace('/', '--')}" / "snapshots"
    return sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []


def require_model(path: str, revision: str | None = None) -> Path:
    """The local directory of model `path` (a directory, or a hub id in the local cache) at `revision` (a
    commit; None = whatever is there); never downloads.

    Raises MissingLocalFiles, one line naming the model, the revision on disk and the command that fetches it."""
    if is_local_path(path):
        p = Path(path)
        if not (p / "config.json").is_file():
            what = "has no config.json" if p.is_dir() else "does not exist"
            raise MissingLocalFiles(f"model directory {path} {what}")
        snap = p.resolve()
        if revision is not None and (snap.parent.name != "snapshots" or snap.name != revision):
            raise MissingLocalFiles(
                f"model directory {path} is not the hub snapshot of model.revision {revision} "
                + (f"(it is {snap.name})" if snap.parent.name == "snapshots" else "(no hub revision to check)")
                + "; point model.path at that snapshot, or set model.revision: null to use this directory as is")
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or a revision that was never fetched
        fetch = f"python -m ctpo.hub fetch --model {path}" + (f" --revision {revision}" if revision else "")
        have = cached_revisions(path)
        if revision and have:
            raise MissingLocalFiles(
                f"model {path} is in the local HF cache ({HF_HUB_CACHE}) at revision {', '.join(have)}, not "
                f"model.revision {revision}, and this job runs offline; fetch the pinned one where the network "
                f"is: {fetch}") from None
        rev = f" at revision {revision}" if revision else ""
        raise MissingLocalFiles(
            f"model {path}{rev} is not in the local HF cache ({HF_HUB_CACHE}) and this job runs offline "
            f"({type(e).__name__}); fetch it where the network is: {fetch}"
        ) from None


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def incomplete(snapshot: str | Path) -> list[str]:
    """What is missing from a model directory (an HF cache snapshot or a save_pretrained dir), one phrase each;
    [] when complete: config.json, tokenizer_config.json and a tokenizer file, the weights (every shard the
    weight index names, or the single weights file), and no file that is a dangling link or empty (an
    interrupted download)."""
    import json

    d = Path(snapshot)
    if not d.is_dir():
        return [f"{d} is not a directory"]
    problems = []
    for f in sorted(d.rglob("*")):
        if f.is_symlink() and not f.exists():
            problems.append(f"{f.relative_to(d)} is a dangling link (its blob is missing)")
        elif f.is_file() and f.stat().st_size == 0:
            problems.append(f"{f.relative_to(d)} is empty")
    for name in ("config.json", "tokenizer_config.json"):
        if not (d / name).is_file():
            problems.append(f"no {name}")
    if not any((d / t).is_file() for t in TOKENIZER_FILES):
        problems.append(f"no tokenizer file ({' / '.join(TOKENIZER_FILES)})")
    index = next((d / i for i in WEIGHT_INDEXES if (d / i).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            return problems + [f"{index.name} is not a weight index ({type(e).__name__})"]
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            problems.append(f"{len(missing)} of {len(shards)} weight shards named in {index.name} are missing "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    elif not any((d / w).is_file() for w in SINGLE_WEIGHTS):
        problems.append(f"no weights ({' / '.join(WEIGHT_INDEXES + SINGLE_WEIGHTS)})")
    return problems


def require_complete(path: str, revision: str | None = None) -> Path:
    """`require_model`, then `incomplete`: raises MissingLocalFiles naming what is missing and how to fetch it."""
    local = require_model(path, revision)
    problems = incomplete(local)
    if problems:
        fetch = f"python -m ctpo.hub fetch --model {path}" + (f" --revision {revision}" if revision else "")
        raise MissingLocalFiles(f"model {path} at {local} is incomplete: {'; '.join(problems)}; fetch it again "
                                f"where the network is: {fetch}")
    return local


def fetch_model(path: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, cache_dir=cache_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctpo.hub", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("fetch", "check"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--revision")
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", help="fetch: marker JSON with the commit that was fetched (the pin)")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        local = fetch_model(args.model, args.revision, args.cache_dir)
        print(f"hub: {args.model} -> {local}")
        problems = incomplete(local)
        if problems:
            print(f"error: model {args.model} at {local} is incomplete after the download: {'; '.join(problems)}",
                  file=sys.stderr)
            return 2
        if not (args.revision and args.revision == local.name):  # a branch or nothing: the result can move
            print(f"hub: warning: {args.model} is not pinned (revision {args.revision or 'main'} -> commit "
                  f"{local.name}); set model.revision: {local.name} in its configs/models/ file", file=sys.stderr)
        if args.out:
            from ctpo.io import write_json

            # the snapshot directory is named by the commit: what every offline job will load
            write_json(args.out, {"model": args.model, "requested_revision": args.revision,
                                  "commit": local.name, "local_dir": str(local)})
        return 0
    set_offline()
    try:
        print(f"hub: {args.model} is complete on disk at {require_complete(args.model, args.revision)}")
    except MissingLocalFiles as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
