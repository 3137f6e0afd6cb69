"""The release's grader: how the authors' verl fork scored training and validation (our code, their rules).

`ctpo.sh` names no custom reward, so the fork's `default_compute_score` (verl/utils/reward_score/__init__.py)
grades every response: it is correct when any of three scorers says so.

1. `math_reward` (`boxed_match`): the last `\\boxed` of the whole response (or, when the text contains
   `\\boxed ` with a space, the text after the last `\\boxed ` up to the next `$`; with no `\\boxed` at all,
   the last `\\fbox{..}`, which its unboxing then rejects), string-normalised as in Hendrycks' MATH
   (`_strip`: spaces, `\\left`/`\\right`, `tfrac`/`dfrac`, degrees, `\\$`, `\\%`, units after `\\text{ `, a
   short `k =` prefix, `\\sqrt3`, `\\frac12`, `a/b`, `0.5`) and compared as strings with the equally
   normalised ground truth.
2. `math_dapo` (`answer_line_match`): in the last 300 characters, the last line `Answer: ...` (any case),
   normalised as in Minerva (`_minerva_normalize`: the text after the last `=`, units and filler words
   dropped, `\\text{}`/`\\boxed{}`/`$` unwrapped, thousands separators removed) and compared as strings.
3. `math_verify`: math-verify over the whole decoded response, tool outputs included (prediction
   extraction: expressions and LaTeX; gold: LaTeX; numbers rounded to 6 places), against each of the gold
   candidates `gold_candidates` builds (as given, an integer without leading zeros, `$..$` stripped, boxed).

A response the release could score 1 is correct here too; the string scorers run in the caller (linear in the
response, bounded text), math-verify runs in `ctpo.reward`'s bounded-time worker pool under the same deadline
rules as the strict grader (`ctpo.reward.score`), and a check that overruns scores 0 with reason "timeout"
(the release's math-verify timeouts also scored 0). Facts from the release (horizon-llm/CTPO, commit
acc4021); the code is ours. What differs: the release installed math-verify unpinned; we run the pinned one.

    score(response, ground_truth, timeout_s=5.0) -> ctpo.reward.RewardResult (reason: correct | wrong | timeout)
    compute_score(...): verl's `reward.custom_reward_function` (path pkg://ctpo.release_reward)
"""
from __future__ import annotations

import math
import re
import time

from ctpo.reward import GroundTruthError, RewardResult

DAPO_TAIL_CHARS = 300  # math_dapo reads only the end of a response
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def _gold(ground_truth) -> str:
    if ground_truth is None or (isinstance(ground_truth, float) and math.isnan(ground_truth)):
        raise GroundTruthError(f"ctpo.release_reward: ground truth is missing ({ground_truth!r}); fix the data")
    gold = str(ground_truth)
    if not gold.strip():
        raise GroundTruthError(f"ctpo.release_reward: ground truth is empty ({ground_truth!r}); fix the data")
    return gold


# ----------------------------------------------------------------------------- 1. last \boxed, MATH strings


def _balanced_from(text: str, start: int) -> str | None:
    """text[start : end + 1] where `end` closes the first brace group opened at or after `start`, or None."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def release_boxed(text: str) -> str | None:
    """The answer math_reward reads, or None (no box, an unclosed box, or a box its unboxing rejects)."""
    if "\\boxed " in text:  # takes precedence over any \boxed{..}
        return text.split("\\boxed ")[-1].split("$")[0]
    i = text.rfind("\\boxed")
    head = "\\boxed{"
    if i < 0:
        i, head = text.rfind("\\fbox"), None  # found, but unboxing requires "\boxed{": never an answer
        if i < 0:
            return None
    box = _balanced_from(text, i)
    if box is None or head is None or not box.startswith(head):
        return None
    return box[len(head) : -1]


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; a `\\frac` with one character after it leaves the
    string as it was; one with nothing after it raises (as the release's indexing did)."""
    parts = s.split("\\frac")
    out = [parts[0]]
    for p in parts[1:]:
        if not p:
            raise ValueError("\\frac at the end")
        if p.startswith("{"):
            out.append("\\frac" + p)
        elif len(p) < 2:
            return s
        elif p[1] == "{":
            out.append("\\frac{" + p[0] + "}" + p[1:])
        else:
            out.append("\\frac{" + p[0] + "}{" + p[1] + "}" + p[2:])
    return "".join(out)


def _fix_slash(s: str) -> str:
    """`3/4` (two plain integers) -> \\frac{3}{4}."""
    parts = s.split("/")
    if len(parts) == 2 and all(re.fullmatch(r"[+-]?\d+", p) for p in parts) and s == f"{int(parts[0])}/{int(parts[1])}":
        return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return s


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    parts = s.split("\\sqrt")
    return parts[0] + "".join("\\sqrt" + (p if p.startswith("{") else "{" + p[:1] + "}" + p[1:]) for p in parts[1:])


def _strip(s: str) -> str:
    """MATH-style normalisation of an answer string (the release's `strip_string`, step for step). Raises
    ValueError where the release raised (then it compared the raw strings)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s:  # units on the right
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one \\text{ }")
        s = parts[0]
    s = s.replace("\\\\%", "").replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    if "\\sqrt" in s:
        if any(not p for p in s.split("\\sqrt")[1:]):
            raise ValueError("\\sqrt at the end")
        s = _fix_sqrt(s)
    s = _fix_fracs(s.replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def _equiv(a: str, b: str) -> bool:
    try:
        return _strip(a) == _strip(b)
    except (ValueError, IndexError):
        return a == b


def boxed_match(response: str, gold: str) -> tuple[bool, str]:
    """Scorer 1 (math_reward): (hit, the boxed answer read or "")."""
    ans = release_boxed(response)
    return (ans is not None and _equiv(ans, gold)), ans or ""


# ----------------------------------------------------------------------------- 2. Answer: line, Minerva strings

_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots")


def _minerva_normalize(s: str) -> str:
    """Minerva-style normalisation (the release's math_dapo `normalize_final_answer`), in its order."""
    s = s.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        s = s.replace(old, new)
    for word in _REMOVED:
        s = s.replace(word, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)  # keep the first $..$
    for cmd in ("text", "textbf", "overline"):
        s = re.sub(r"(\\" + cmd + r"\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
    s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
    s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def answer_line_match(response: str, gold: str) -> tuple[bool, str]:
    """Scorer 2 (math_dapo): (hit, the `Answer:` text read or "") from the last DAPO_TAIL_CHARS characters."""
    lines = _ANSWER_LINE.findall(response[-DAPO_TAIL_CHARS:])
    pred = _minerva_normalize(lines[-1] if lines else "[INVALID]")
    return pred == _minerva_normalize(gold), (lines[-1].strip() if lines else "")


# ----------------------------------------------------------------------------- 3. math-verify over the response


def gold_candidates(gold: str) -> list[str]:
    """The gold forms math-verify is tried against, in order, without repeats: as given (stripped), an integer
    with its leading zeros dropped, the inside of `$..$`, and the boxed form."""
    raw = gold.strip()
    norm = raw
    sign, body = (raw[0], raw[1:]) if raw[:1] in ("+", "-") else ("", raw)
    if body.isdigit():
        norm = f"{sign}{int(body)}"
    out: list[str] = []
    for c in (raw, norm, norm[1:-1].strip() if len(norm) >= 2 and norm[0] == norm[-1] == "$" else ""):
        if c and c not in out:
            out.append(c)
    if norm and "\\boxed{" not in norm and "\\boxed{" + norm + "}" not in out:
        out.append("\\boxed{" + norm + "}")
    return out


def verify_in_worker(response: str, gold: str) -> str:
    """Runs in a ctpo.reward worker: 'correct' | 'wrong' (math-verify's own timeouts off: the pool's deadline
    bounds the call). A gold candidate math-verify cannot read is skipped, as the release's errors were."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    preds = parse(response, (ExprExtractionConfig(), LatexExtractionConfig()), parsing_timeout=None)
    for cand in gold_candidates(gold):
        try:
            golds = parse(cand, (LatexExtractionConfig(),), parsing_timeout=None)
            if golds and preds and verify(golds, preds, float_rounding=6, timeout_seconds=None):
                return "correct"
        except Exception:  # noqa: BLE001 - the release caught every error per candidate
            continue
    return "wrong"


# ----------------------------------------------------------------------------- public API


def score(response: str, ground_truth, timeout_s: float = 5.0) -> RewardResult:
    """The release's verdict on one response; never raises on model output (GroundTruthError for bad data).
    `extracted`: the answer the deciding scorer read (boxed, else the Answer: line; "" for math-verify)."""
    from ctpo import reward

    t0 = time.monotonic()
    gold = _gold(ground_truth)
    if not isinstance(response, str):
        return RewardResult(0.0, "", "wrong")
    hit, boxed = boxed_match(response, gold)
    if hit:
        return RewardResult(1.0, boxed, "correct")
    hit, line = answer_line_match(response, gold)
    if hit:
        return RewardResult(1.0, line, "correct")
    verdict = reward._pool().check(response, gold, timeout_s, t0, grader="release")
    shown = boxed or line
    if verdict is None:
        return RewardResult(0.0, shown, "timeout")
    return RewardResult(1.0 if verdict == "correct" else 0.0, shown, "correct" if verdict == "correct" else "wrong")


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl `reward.custom_reward_function` entry point (path: pkg://ctpo.release_reward, name: compute_score)."""
    r = score(solution_str, ground_truth)
    return {"score": r.score, "acc": r.score, "timeout": float(r.reason == "timeout")}
