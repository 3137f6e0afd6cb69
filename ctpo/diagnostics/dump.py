"""Rollout dumps (`runs/.../rollouts/step{N}.npz`, arrays in ctpo.schema.ROLLOUT_ARRAYS): `save` writes one
(the local trainer, the verl shards and their merge all go through it), `iter_row_chunks` reads it in row chunks.

`np.load` on an .npz inflates a whole member at once; a paper-scale dump holds 4096 x 8000 tokens per
array. Here each member's .npy header is parsed and its rows are read `chunk_rows` at a time from the
(possibly deflated) zip stream, so peak memory is a few chunks, whatever N is.
"""
from __future__ import annotations

import re
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np

from ctpo.io import atomic_path
from ctpo.schema import ROLLOUT_ARRAYS

# The arrays the diagnostics need (advantages are not used: the clip rates count every token).
DIAG_ARRAYS = ("old_log_prob", "log_prob", "response_mask")


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` (exactly ROLLOUT_ARRAYS) to `path` as .npz, atomically."""
    if set(arrays) != set(ROLLOUT_ARRAYS):
        raise ValueError(f"{path}: a rollout dump holds exactly {list(ROLLOUT_ARRAYS)}, got {sorted(arrays)}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to a bare path
            np.savez(f, **{k: arrays[k] for k in ROLLOUT_ARRAYS})
    return Path(path)


def dump_step(path: str | Path) -> int:
    """The training step from a dump's file name `step{N}.npz`."""
    m = re.fullmatch(r"step(\d+)\.npz", Path(path).name)
    if not m:
        raise ValueError(f"{path}: rollout dump must be named step<N>.npz")
    return int(m.group(1))


def _open_member(zf: zipfile.ZipFile, name: str, path: Path):
    member = f"{name}.npy"
    if member not in zf.namelist():
        raise ValueError(f"{path}: missing array '{name}' (dump arrays: {', '.join(ROLLOUT_ARRAYS)})")
    fp = zf.open(member)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    if len(shape) != 2 or fortran or dtype.hasobject:
        raise ValueError(f"{path}: array '{name}' must be a C-order numeric (N, T) array, got shape {shape}")
    return fp, shape, dtype


def iter_row_chunks(path: str | Path, chunk_rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Yield dicts {name: (n, T) array} for DIAG_ARRAYS, n <= chunk_rows, rows in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rollout dump not found")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    with ExitStack() as stack:
        try:
            zf = stack.enter_context(zipfile.ZipFile(path))
        except zipfile.BadZipFile:
            raise ValueError(f"{path}: not an .npz archive") from None
        members = {name: _open_member(zf, name, path) for name in DIAG_ARRAYS}
        for fp, _, _ in members.values():
            stack.enter_context(fp)
        shapes = {name: m[1] for name, m in members.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{path}: arrays must share one (N, T) shape, got {shapes}")
        n_rows, n_cols = shapes["old_log_prob"]
        for start in range(0, n_rows, chunk_rows):
            n = min(chunk_rows, n_rows - start)
            chunk = {}
            for name, (fp, _, dtype) in members.items():
                nbytes = n * n_cols * dtype.itemsize
                buf = fp.read(nbytes)
                if len(buf) != nbytes:
                    raise ValueError(f"{path}: array '{name}' is truncated")
                chunk[name] = np.frombuffer(buf, dtype=dtype).reshape(n, n_cols)
            yield chunk
