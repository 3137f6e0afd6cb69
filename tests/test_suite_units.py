"""How `make test` splits the suite over two xdist workers (tests/conftest.py): the toy warm start is built by
one worker only, each other file is one unit, and the order list names files that exist."""
from __future__ import annotations

from pathlib import Path

from conftest import LONGEST_FIRST, WARMSTART_FILES, WARMSTART_UNIT, unit_of

TESTS = Path(__file__).resolve().parent


def test_every_file_that_uses_the_warm_start_is_in_its_unit():
    users = {p.name for p in TESTS.glob("test_*.py")
             if p.name != Path(__file__).name and any(f in p.read_text() for f in ("toy_warmstart", "verl_toy"))}
    assert users and users <= WARMSTART_FILES, users - WARMSTART_FILES


def test_warm_start_files_share_one_unit_and_other_files_stay_apart():
    assert {unit_of(f"tests/{name}::test_a[x]") for name in WARMSTART_FILES} == {WARMSTART_UNIT}
    assert unit_of("tests/test_reward.py::test_a") == "test_reward.py"
    assert unit_of("tests/test_reward.py::test_b[1-2]") == unit_of("tests/test_reward.py::test_a")
    assert unit_of("tests/test_dag.py::test_a") != unit_of("tests/test_reward.py::test_a")


def test_the_order_list_names_existing_test_files():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [n for n in LONGEST_FIRST if not (TESTS / n).is_file()] == []
