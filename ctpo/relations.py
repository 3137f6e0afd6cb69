"""The relation guard of `ctpo.reward`: finds the relations an answer is written with, on the text and on
math-verify's parse of it, so that a relation never earns the credit of its last side.

Rule (`ctpo.reward` module doc): when the ground truth is a value, an answer written as a relation earns
credit only as an equation chain whose left side names the answer and whose every other side equals the
ground truth. What counts as a relation here, beyond `=`, `<`, `\\le`, `\\to`, ...:

- unicode and macro forms: fullwidth / small-form `＝ ﹦ ＜`, `⩵ ≔ ≟ ∈ ⊂ ⇒ ⊢ …` (any mathematical symbol whose
  Unicode name is a relation's), `\\coloneqq \\doteq \\triangleq \\equiv \\in \\subset \\mid \\vdash \\ll …`, the
  negated family `\\neq \\ne \\not \\nleq \\nsim …`, and relation builders `\\mathrel{.} \\stackrel{.}{.}
  \\overset{.}{.}` (their relation sits in a brace group: see below);
- spacing, style and colour macros are removed, never names: `205 \\quad = 204` and
  `205 \\color{white} = 204` are `205 = 204`;
- braces: redundant outer braces are dropped (`{{205 = 204}}` is `205 = 204`); a relation inside any other
  plain brace group (`205 {=} 204`, `\\frac{a=1}{2}`) is a hidden relation: wrong. Sub/superscripts
  (`\\sum_{k=1}`, `\\lim_{x \\to 0}`) and set braces `\\{ \\}` are not relations of the answer;
- negation (`\\neg 204`, `\\lnot`, `¬`) makes a logical formula, not a value: wrong;
- the left side of an equation chain must name a quantity in text (`names_answer`) and as parsed
  (`names_quantity`: a symbol or a function's value), so `205 \\mbox{} = 204` names nothing;
- on the parsed answer: math-verify's sympy result holding a relation or a logical value (Eq, Ne, <,
  True/False, Not, And, ...) is wrong; an answer whose LaTeX does not parse is read by math-verify's plain
  expression fallback only when that fallback reads the whole answer (it otherwise grades a fragment, such
  as the last number of `205 \\vdash 204`): else parse_error.

Text functions are plain Python (linear in the answer, which `ctpo.reward` bounds to 1024 characters); the
parsed checks import sympy and run in the reward worker.
"""
from __future__ import annotations

import re
import unicodedata

# "=" family: relations that name the answer on their left (`x = 204`, `x := 204`, `x \in [0, 1]`)
NAMING = "="
_EQUALS = {"=", ":=", "==", "=:", "≔", "≕", "∈", "\\in", "\\coloneqq", "\\coloneq", "\\Coloneqq", "\\eqqcolon",
           "\\eqcolon"}
_MACRO_RELATIONS = (
    "implies impliedby iff to approx approxeq le leq leqq leqslant ge geq geqq geqslant lt gt ne neq not notin"
    " equiv sim simeq cong propto mapsto longmapsto gets rightarrow Rightarrow longrightarrow Longrightarrow"
    " leftarrow Leftarrow longleftarrow Longleftarrow leftrightarrow Leftrightarrow longleftrightarrow"
    " Longleftrightarrow hookrightarrow hookleftarrow rightsquigarrow leadsto uparrow downarrow Uparrow"
    " Downarrow xrightarrow xleftarrow xRightarrow xLeftarrow coloneqq coloneq Coloneqq eqqcolon eqcolon in ni"
    " owns doteq doteqdot triangleq eqdef stackrel overset underset mathrel asymp bumpeq Bumpeq circeq eqcirc"
    " risingdotseq fallingdotseq thicksim thickapprox backsim backsimeq eqsim lesssim gtrsim lessapprox"
    " gtrapprox lessgtr gtrless lesseqgtr gtreqless ll gg lll ggg llless gggtr prec succ preceq succeq"
    " preccurlyeq succcurlyeq precsim succsim subset supset subseteq supseteq subsetneq supsetneq sqsubset"
    " sqsupset sqsubseteq sqsupseteq Subset Supset mid parallel perp vdash dashv models vDash Vdash Vvdash"
    " smile frown bowtie Join therefore because nless ngtr nleq ngeq nleqslant ngeqslant nleqq ngeqq lneq gneq"
    " lneqq gneqq nsim ncong nmid nparallel nsubseteq nsupseteq nprec nsucc npreceq nsucceq nleftarrow"
    " nrightarrow nLeftarrow nRightarrow nleftrightarrow nLeftrightarrow nvdash nvDash nVdash nVDash"
    " ntriangleleft ntriangleright ntrianglelefteq ntrianglerighteq triangleleft triangleright"
    " trianglelefteq trianglerighteq vartriangleleft vartriangleright lhd rhd unlhd unrhd"
).split()
_NEGATIONS = ("\\neg", "\\lnot", "¬")
_ASCII_RELATIONS = ("<=>", "<->", "-->", "<=", ">=", "==", "!=", ":=", "=:", "->", "=>", "<>", "=", "<", ">")
# Unicode names of relation symbols (mathematical operators, arrows and their supplements)
_RELATION_NAMES = re.compile(
    r"EQUAL|EQUIVALENT|IDENTICAL|LESS-THAN|GREATER-THAN|TILDE|APPROXIMATELY|ASYMPTOTICALLY|PROPORTIONAL"
    r"|ELEMENT OF|CONTAINS AS|SUBSET|SUPERSET|PRECEDES|SUCCEEDS|DIVIDES|PARALLEL|TACK|\bTRUE\b|FORCES|MODELS"
    r"|ARROW|THEREFORE|BECAUSE|PROPORTION|BETWEEN|NORMAL SUBGROUP|CONTAINS AS NORMAL"
)
_UNICODE_BLOCKS = ((0x2190, 0x22FF), (0x27F0, 0x27FF), (0x2900, 0x2AFF))
UNICODE_RELATIONS = frozenset(
    chr(c) for lo, hi in _UNICODE_BLOCKS for c in range(lo, hi + 1)
    if unicodedata.category(chr(c)) in ("Sm", "So") and _RELATION_NAMES.search(unicodedata.name(chr(c), ""))
    and chr(c) != "¬"
)

_SPACING = re.compile(
    r"\\(?:qquad|quad|enspace|enskip|thinspace|medspace|thickspace|negthinspace|negmedspace|negthickspace"
    r"|hfill|space|nobreakspace)(?![A-Za-z])"
    r"|\\[hv]space\*?\s*\{[^{}]*\}|\\(?:hskip|kern|mkern|mskip)\s*-?[\d.]+\s*(?:em|ex|pt|mu|cm|mm|in)?"
    r"|\\[,;:! ]|~"
    # presentation: styles and colours are never a name (`205 \\color{white} = 204` is `205 = 204`)
    r"|\\(?:display|text|script|scriptscript)style(?![A-Za-z])"
    r"|\\(?:color|textcolor|colorbox|mathcolor)\s*\{[^{}]*\}"
    r"|\\(?:rm|bf|it|sf|tt|normalfont|tiny|small|normalsize|large|Large|LARGE|huge|Huge)(?![A-Za-z])"
)
_TOKEN = re.compile(
    r"\\[{}]|\\[lr]brace(?![A-Za-z])|[_^]\s*\{|[{}]"
    r"|\\(?:" + "|".join(sorted(_MACRO_RELATIONS, key=len, reverse=True)) + r")(?![A-Za-z])"
    r"|\\[A-Za-z]+"  # any other macro: consumed whole, so `\lesssim` never yields `\le`
    r"|" + "|".join(re.escape(t) for t in _ASCII_RELATIONS)
    + r"|[" + re.escape("".join(sorted(UNICODE_RELATIONS))) + r"]"
)
_GROUP_OPEN = {"{": "brace", "\\{": "set", "\\lbrace": "set"}
_GROUP_CLOSE = {"}", "\\}", "\\rbrace"}


def _fold(ch: str) -> str:
    """Fullwidth ASCII forms to ASCII; compatibility forms of relations (`﹦`, `⩵` '==', `⩴` '::=') to ASCII."""
    c = ord(ch)
    if 0xFF01 <= c <= 0xFF5E:
        return chr(c - 0xFEE0)
    if c < 0x80:
        return ch
    k = unicodedata.normalize("NFKC", ch)
    return k if k != ch and k and set(k) <= set("=<>:!") else ch


def canonical(expr: str) -> str:
    """The answer with relation look-alikes folded to ASCII, spacing/style/colour macros removed and redundant outer
    braces dropped (`{{ 205 ＝ 204 }}` -> `205 = 204`)."""
    s = "".join(_fold(ch) for ch in expr)
    s = _SPACING.sub("", s)  # `1\\,000` is 1000; `205 \\quad = 204` is `205 = 204`
    s = " ".join(s.split())
    while s.startswith("{") and _closing_brace(s, 0) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def _closing_brace(s: str, i: int) -> int:
    """Index of the `}` closing the `{` at i (backslash-escaped braces skipped), or -1."""
    depth = 0
    j = i
    while j < len(s):
        ch = s[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _is_relation(tok: str) -> bool:
    if tok.startswith("\\"):
        return tok[1:] in _MACRO_RELATIONS_SET
    return tok in _ASCII_RELATIONS or tok in UNICODE_RELATIONS


_MACRO_RELATIONS_SET = frozenset(_MACRO_RELATIONS)


def scan(expr: str) -> tuple[list[tuple[int, int, str]], list[str], list[str]]:
    """(top-level relations as (start, end, token), relations hidden in plain brace groups, relations inside
    set braces `\\{ \\}`) of `expr`. Relations in sub/superscripts are none of these."""
    top, hidden, in_set, stack = [], [], [], []
    for m in _TOKEN.finditer(expr):
        tok = m.group()
        if tok in _GROUP_OPEN or tok[0] in "_^":
            stack.append("script" if tok[0] in "_^" else _GROUP_OPEN[tok])
        elif tok in _GROUP_CLOSE:
            if stack:
                stack.pop()
        elif _is_relation(tok):
            if not stack:
                top.append((m.start(), m.end(), tok))
            elif "script" not in stack:
                (in_set if "set" in stack else hidden).append(tok)
    return top, hidden, in_set


def split_relations(expr: str) -> tuple[list[str], list[str]]:
    """(sides, relations) of `expr` split at top-level relations (outside braces and scripts); the naming
    relations (`=`, `:=`, `==`, `\\coloneqq`, `\\in`, ...) are reported as '='.
    `x = 2 = 3` -> (['x', '2', '3'], ['=', '='])."""
    top = scan(expr)[0]
    sides, rels, last = [], [], 0
    for start, end, tok in top:
        sides.append(expr[last:start].strip())
        rels.append(NAMING if tok in _EQUALS else tok)
        last = end
    sides.append(expr[last:].strip())
    return sides, rels


def hidden_relations(expr: str) -> list[str]:
    """Relations inside plain brace groups (`205 {=} 204`, `\\mathrel{=}`, `\\frac{a=1}{2}`)."""
    return scan(expr)[1]


def is_relation(expr: str) -> bool:
    """True when `expr` holds a relation anywhere but in a sub/superscript (a ground truth such as
    `y = 2x + 1` or `\\{(x, y) \\mid x + y = 1\\}`, compared whole)."""
    return any(scan(expr))


def negated(expr: str) -> bool:
    """True when the answer holds a logical negation (`\\neg 204`, `\\lnot 204`, `¬204`)."""
    return any(re.search(re.escape(n) + (r"(?![A-Za-z])" if n[0] == "\\" else ""), expr) for n in _NEGATIONS)


_NUMERIC_COMMANDS = re.compile(
    r"\\(?:frac|dfrac|tfrac|sqrt|cdot|times|div|pi|left|right|circ|infty|pm|mp|mathrm|operatorname|text"
    r"|mathbf|displaystyle|degree)(?![A-Za-z])|\\[,;:! ]|\\text\{[^{}]*\}"
)


def names_answer(side: str) -> bool:
    """True when `side` is a variable or an expression naming a quantity (`x`, `f(3)`, `a+b`, `\\angle A`),
    False for a plain number or numeric expression (`205`, `\\frac{1}{2}`, `2\\pi`)."""
    rest = _NUMERIC_COMMANDS.sub(" ", side)
    return bool(re.search(r"[A-Za-z]|\\[A-Za-z]+", rest))


# ----------------------------------------------------------------------------- on the parsed answer


def parse_whole(text: str) -> list:
    """math-verify's parse of `text` (as `\\boxed{text}`): its LaTeX reading, else its plain-expression
    reading only when that reads all of `text` (whitespace aside); [] when neither does."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed = "\\boxed{" + text + "}"
    latex = parse(boxed, (LatexExtractionConfig(),), parsing_timeout=None)
    if latex and not isinstance(latex[0], str):
        return latex
    expr = parse(boxed, (ExprExtractionConfig(),), parsing_timeout=None)
    if expr and not isinstance(expr[0], str) and "".join(str(expr[-1]).split()) == "".join(text.split()):
        return expr
    return []


def holds_relation(parsed) -> bool:
    """True when a parsed answer (sympy) is or contains a relation or a logical value: Eq, Ne, <, ...,
    True/False, Not/And/Or/Implies (a Symbol is a sympy Boolean too, and is not one of these; an Interval's
    open/closed flags are True/False and are not either)."""
    from sympy import Basic, Interval
    from sympy.core.relational import Relational
    from sympy.logic.boolalg import BooleanAtom, BooleanFunction

    if not isinstance(parsed, Basic):
        return isinstance(parsed, bool)
    todo = [parsed]
    while todo:
        node = todo.pop()
        if isinstance(node, (Relational, BooleanAtom, BooleanFunction)):
            return True
        todo.extend((node.start, node.end) if isinstance(node, Interval) else node.args)
    return False


def names_quantity(parsed) -> bool:
    """True when a parsed left side (sympy) holds a symbol or an undefined function's value (`x`, `m + n`,
    `f(3)`, `\\angle A`), not a number dressed in macros (`205 \\mbox{}` parses to 205)."""
    from sympy import Basic
    from sympy.core.function import AppliedUndef

    return isinstance(parsed, Basic) and bool(parsed.free_symbols or parsed.atoms(AppliedUndef))
