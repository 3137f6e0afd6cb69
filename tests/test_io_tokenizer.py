"""Atomic writes lose nothing; the toy tokenizer round-trips Qwen3's chat format."""
import pytest

from ctpo import io
from ctpo.tokenizer import CharTokenizer, load_tokenizer


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    io.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["out.txt"]


def test_jsonl_append_and_read(tmp_path):
    p = tmp_path / "m.jsonl"
    io.append_jsonl(p, [{"step": 1, "x": 0.5}])
    io.append_jsonl(p, [{"step": 2, "x": 1.5}])
    assert io.read_jsonl(p) == [{"step": 1, "x": 0.5}, {"step": 2, "x": 1.5}]


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "b.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert io.sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_char_tokenizer_round_trip_and_specials_are_single_ids(tmp_path):
    tok = CharTokenizer()
    text = "<|im_start|>user\nCompute 12*34.<|im_end|>\n<|im_start|>assistant\n```python\nprint(12*34)\n```"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.encode("<|im_start|>")[0] and len(tok.encode("<|im_start|>")) == 1
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]
    assert tok.encode("a<b") == [tok.encode("a")[0], tok.encode("<")[0], tok.encode("b")[0]]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text) == ids


def test_atomic_dir_replaces_whole_directories_and_cleans_up_on_error(tmp_path):
    d = tmp_path / "policy"
    with io.atomic_dir(d) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(d) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert (d / "w.bin").read_bytes() == b"v1"
    with io.atomic_dir(d) as tmp:
        (tmp / "other.bin").write_bytes(b"v2")
    assert sorted(p.name for p in d.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)])
def test_atomic_outputs_keep_the_process_umask_for_shared_storage(tmp_path, umask, file_mode, dir_mode):
    import os
    import stat

    import pandas as pd

    old = os.umask(umask)
    try:
        assert io.current_umask() == umask
        io.write_json(tmp_path / "results" / "done.json", {"step": 3})
        io.write_parquet(tmp_path / "results" / "eval.parquet", pd.DataFrame({"correct": [True, False]}))
        with io.atomic_dir(tmp_path / "checkpoints" / "step3") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "results" / "done.json") == file_mode
    assert mode(tmp_path / "results" / "eval.parquet") == file_mode
    assert mode(tmp_path / "checkpoints" / "step3") == dir_mode
    assert mode(tmp_path / "checkpoints" / "step3" / "sub") == dir_mode
    assert mode(tmp_path / "checkpoints" / "step3" / "model.safetensors") == file_mode
