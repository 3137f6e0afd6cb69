"""Issue 21, item 5: the relation guard on the parsed answer, and the reward workers' rlimits and scrubbed
environment. The gaming answers are the issue's (each was credited 1.0 before) plus forms found by probing
math-verify 0.9.0: each scores 0. The honest answers beside them keep their credit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ctpo import reward
from ctpo.relations import UNICODE_RELATIONS, canonical, hidden_relations, negated, split_relations
from hang import HANG_S

pytestmark = pytest.mark.slow  # > ~10 s: `make test` starts it first (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]

# every one of these ends in (or reduces to) the ground truth 204 and was scored correct before
GAMING = [
    "\\boxed{{205 = 204}}", "\\boxed{{{205=204}}}", "\\boxed{205 ＝ 204}", "\\boxed{205 ﹦ 204}", "\\boxed{205 ⩵ 204}",
    "\\boxed{205 ≔ 204}", "\\boxed{205 \\coloneqq 204}", "\\boxed{205 \\eqqcolon 204}", "\\boxed{205 \\doteq 204}",
    "\\boxed{205 \\quad = 204}", "\\boxed{205 \\qquad = 204}", "\\boxed{205 \\hspace{1em} = 204}",
    "\\boxed{205 \\; = 204}", "\\boxed{205~=~204}", "\\boxed{\\neg 204}", "\\boxed{\\lnot 204}", "\\boxed{¬204}",
    "\\boxed{205 \\not= 204}", "\\boxed{205 \\not\\approx 204}", "\\boxed{205 \\nsim 204}", "\\boxed{205 \\nleq 204}",
    "\\boxed{205 \\ngtr 204}", "\\boxed{205 \\equiv 204}", "\\boxed{205 \\stackrel{?}{=} 204}",
    "\\boxed{205 \\overset{?}{=} 204}", "\\boxed{205 \\mathrel{=} 204}", "\\boxed{205 {=} 204}",
    "\\boxed{205 {\\coloneqq} 204}", "\\boxed{\\left\\{205 = 204\\right\\}}", "\\boxed{\\{205 = 204\\}}",
    "\\boxed{205 \\Longleftrightarrow 204}", "\\boxed{205 \\leftrightarrow 204}", "\\boxed{205 \\lessgtr 204}",
    "\\boxed{205 \\vdash 204}", "\\boxed{205 \\ll 204}", "\\boxed{205 \\prec 204}", "\\boxed{205 \\in 204}",
    "\\boxed{205 \\subset 204}", "\\boxed{205 \\perp 204}", "\\boxed{205 \\parallel 204}", "\\boxed{205 \\mid 204}",
    "\\boxed{205 \\lor 204}", "\\boxed{205 \\land 204}", "\\boxed{205 \\vert 204}", "\\boxed{205 ⇒ 204}",
    "\\boxed{205 ⊢ 204}", "\\boxed{205 -> 204}", "\\boxed{205 => 204}", "\\boxed{\\not 204}", "\\boxed{\\sim 204}",
    "\\boxed{x = {205 = 204}}", "\\boxed{x = 205 \\quad = 204}", "\\boxed{205 \\textstyle = 204}",
    "\\boxed{205 \\color{white} = 204}", "\\boxed{205 \\text{=} 204}", "\\boxed{\\phantom{205=}204}",
    "\\boxed{205 ≟ 204}", "\\boxed{205 \\mkern5mu = 204}", "\\boxed{\\textcolor{white}{205=}204}",
    "\\boxed{205 \\mbox{} = 204}", "\\boxed{205 \\relax = 204}", "\\boxed{205 \\strut = 204}",
]


@pytest.mark.parametrize("solution", GAMING)
def test_relations_in_any_spelling_earn_no_credit(solution):
    r = reward.score(solution, "204")
    assert r.score == 0.0 and r.reason in ("wrong", "parse_error"), r


# honest answers the guard must leave credited: (solution, ground truth)
HONEST = [
    ("\\boxed{204}", "204"), ("\\boxed{{204}}", "204"), ("\\boxed{204 \\quad}", "204"), ("\\boxed{１２}", "12"),
    ("\\boxed{x = 204}", "204"), ("\\boxed{x \\coloneqq 204}", "204"), ("\\boxed{x \\, = \\, 204}", "204"),
    ("\\boxed{x \\in [0, 1]}", "[0, 1]"), ("\\boxed{\\sum_{k=1}^{3} k}", "6"), ("\\boxed{(1,2]}", "(1,2]"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"), ("\\boxed{1\\,000}", "1000"), ("\\boxed{-204}", "-204"),
    ("\\boxed{5!}", "120"), ("\\boxed{f(3) = 204}", "204"), ("\\boxed{\\angle A = 204}", "204"),
    ("\\boxed{\\text{area} = 204}", "204"), ("\\boxed{m + n = 204}", "204"),
    ("\\boxed{\\{x \\mid x > 0\\}}", "\\{x \\mid x > 0\\}"),  # a relation in a set: a relation ground truth ("\\boxed{\\left(1, 2\\right)}", "(1,2)"), ("\\boxed{y = 2x + 1}", "y = 2x + 1"),
]


@pytest.mark.parametrize("solution,truth", HONEST)
def test_honest_answers_keep_their_credit(solution, truth):
    r = reward.score(solution, truth)
    assert (r.score, r.reason) == (1.0, "correct"), r


def test_guard_reads_relations_by_spelling_not_position():
    assert canonical("{{ 205 ＝ 204 }}") == "205 = 204"
    assert canonical("205 \\quad = \\hspace{2pt} 204") == "205 = 204"
    assert split_relations("x \\coloneqq 2 \\cdot 102 = 204") == (["x", "2 \\cdot 102", "204"], ["=", "="])
    assert split_relations("205 \\lesssim 204")[1] == ["\\lesssim"]  # not `\le` followed by `ssim`
    assert split_relations("\\sum_{k=1}^{3} k")[1] == [] and hidden_relations("\\sum_{k=1}^{3} k") == []
    assert hidden_relations("205 {=} 204") == ["="] and hidden_relations("\\frac{a=1}{2}") == ["="]
    assert negated("\\neg 204") and negated("¬ 204") and not negated("\\negthinspace 204") and not negated("5!")
    # Unicode relations come from the Unicode names: a sample of each kind is in, operators are out
    assert {"≠", "≤", "≈", "≡", "∈", "⊂", "⇒", "→", "⊢", "∝", "∼", "≔"} <= UNICODE_RELATIONS
    assert not {"+", "−", "×", "·", "∘", "√", "∞", "∑", "∫", "∩", "∪", "∠", "¬"} & UNICODE_RELATIONS


# ----------------------------------------------------------------------------- worker limits and environment


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits as {name: (soft, hard)} (the kernel's record of the process's rlimits)."""
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def test_workers_start_scrubbed_and_limited(monkeypatch):
    secrets = {"HF_TOKEN": "hf_secret_21", "WANDB_API_KEY": "wandb_secret_21", "AWS_SECRET_ACCESS_KEY": "aws_21",
               "GITHUB_TOKEN": "gh_21", "SOME_PASSWORD": "pw_21"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    pool = reward._WorkerPool(2)
    try:
        assert pool.check("x = 204", "204", timeout_s=HANG_S, t0=__import__("time").monotonic()) == "correct"
        [w] = pool.all
        environ = Path(f"/proc/{w.proc.pid}/environ").read_bytes().split(b"\0")
        keys = {e.split(b"=", 1)[0].decode() for e in environ if e}
        assert keys <= set(reward.WORKER_ENV_KEYS) | {"CTPO_REWARD_PARENT"}, keys
        assert not [v for v in secrets.values() if v.encode() in b"".join(environ)]
        lim = _limits(w.proc.pid)
        assert lim["Max address space"] == (str(reward.WORKER_MEMORY_MB << 20),) * 2
        assert lim["Max open files"] == (str(reward.WORKER_NOFILE),) * 2
        assert lim["Max processes"] == ("0", "0") and lim["Max file size"] == ("0", "0")
        assert lim["Max core file size"] == ("0", "0")
        cpu_soft = int(lim["Max cpu time"][0])  # the CPU seconds used so far + this check's budget
        used = sum(float(x) for x in Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        assert used / os.sysconf("SC_CLK_TCK") < cpu_soft <= used / os.sysconf("SC_CLK_TCK") + 1 + HANG_S + 1
    finally:
        pool.close()


def _limited(code: str) -> subprocess.CompletedProcess:
    """`code` run after the worker's own `_limit_self()` (the function the worker calls before any request)."""
    prog = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom ctpo import reward\nreward._limit_self()\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=HANG_S, cwd="/tmp")


def test_worker_limits_hold_memory_files_and_writes(tmp_path):
    big = _limited(f"try:\n    b = bytearray({reward.WORKER_MEMORY_MB + 256} << 20)\nexcept MemoryError:\n    print('refused')")
    assert big.stdout.strip() == "refused", big.stderr
    files = _limited("import os\nfs = []\ntry:\n    [fs.append(os.open('/dev/null', 0)) for _ in range(1000)]\n"
                     "except OSError as e:\n    print('refused', len(fs) < %d)" % reward.WORKER_NOFILE)
    assert files.stdout.strip() == "refused True", files.stderr
    write = _limited(f"import errno\nf = open({str(tmp_path / 'x')!r}, 'w')\ntry:\n    f.write('data'); f.flush()\n"
                     "except OSError as e:\n    print(errno.errorcode[e.errno])")  # Python ignores SIGXFSZ: EFBIG
    assert write.stdout.strip() == "EFBIG" and (tmp_path / "x").stat().st_size == 0, write.stderr
    if os.geteuid() != 0:  # RLIMIT_NPROC does not bind root (the kernel exempts CAP_SYS_RESOURCE)
        fork = _limited("import os\ntry:\n    os.fork()\nexcept OSError:\n    print('refused')")
        assert fork.stdout.strip() == "refused"


def test_cpu_budget_ends_a_spinning_worker():
    """The per-check CPU budget: a check spinning past it gets SIGXCPU (the pool then replaces the worker)."""
    prog = (f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom ctpo import reward\n"
            "reward._cpu_budget(1)\nwhile True:\n    pass\n")
    proc = subprocess.Popen([sys.executable, "-c", prog])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with the child's own rusage
    assert proc.returncode == -signal.SIGXCPU
    cpu = usage.ru_utime + usage.ru_stime  # the import's CPU seconds rounded up, + the 1 s budget
    assert 1.0 <= cpu < 4.0, cpu
