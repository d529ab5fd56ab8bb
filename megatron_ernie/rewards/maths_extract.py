"""Maths answers, ours: which answer a response commits to (`extract_answer`): its boxes, its
answer phrase, or the last sentence that states a result; never the think block, a number out
of a larger expression, a check line or a restated question. See `math_verify.py`."""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from megatron_ernie.rewards.maths_answers import (_BOX_JOINER, _MAX_ELEMENTS, _PCT_WORDS, _brace_pairs, _key,
                                                  _split_label, _unit_key, _unwrap, normalize_answer,
                                                  undouble_backslashes)
from megatron_ernie.rewards.text import strip_think

# ---------------------------------------------------------------------------------------------
# Response text: backslashes, boxes, end-of-turn tokens
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Every complete `\\boxed{…}` / `\\fbox{…}` (and brace-less `\\boxed 5`): (start, end, content)."""
    found, pairs = [], None
    for m in _BOXED.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs  # one pass, not one per box
            if j not in pairs:
                continue  # truncated response: an unclosed box is no answer
            found.append((m.start(), pairs[j] + 1, text[j + 1:pairs[j]].strip()))
        else:
            tail = re.match(r"[^\s$]+", text[j:])
            if tail:
                found.append((m.start(), j + tail.end(), tail.group(0).strip()))
    # a box inside a box (\boxed{\boxed{5}}) is the same answer
    return [b for b in found if b[2] and not any(o[0] < b[0] and b[1] <= o[1] for o in found)]


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` or `\\fbox{…}` (nested braces allowed; also the
    brace-less `\\boxed 5`)."""
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None




def _final_boxes(text: str) -> tuple[list[str], list[str]]:
    """(the boxes of the final answer, all distinct boxes). Boxes that follow each other with
    only separators, "and"/"or" or labels between them form one answer; prose between two boxes
    ("then corrected:") means the later one replaces the earlier."""
    boxes = _boxes(text)
    if not boxes:
        return [], []
    group = [boxes[-1]]
    for prev in reversed(boxes[:-1]):
        between = text[prev[1]:group[0][0]]
        if len(between) > 80 or not _BOX_JOINER.fullmatch(between):
            break
        group.insert(0, prev)
    return _dedupe(b[2] for b in group), _dedupe(b[2] for b in boxes)


def _dedupe(items) -> list[str]:
    out = []
    for it in items:
        if it not in out:
            out.append(it)
    return out


_END_OF_TURN = re.compile(r"<\|(?:im_start|im_end|endoftext|end_of_sentence|eot_id|end)\|>|</s>")


def _answer_part(response: str, think: bool) -> str:
    text = strip_think(response) if think else response
    m = _END_OF_TURN.search(text)  # a response that runs on into a next turn: the rest is not its answer
    return undouble_backslashes(text[:m.start()] if m else text)


# ---------------------------------------------------------------------------------------------
# Prose: maths spans, sentences, clauses
# ---------------------------------------------------------------------------------------------

_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-z]{3,}")


def _math_regions(text: str) -> list[tuple[int, int]]:
    """Delimited maths: `$$…$$`, `\\[…\\]`, `\\(…\\)`, `$…$` (a `$` before a number with prose up
    to the next `$`, or none on its line, is a currency sign)."""
    out, i, n = [], 0, len(text)
    unclosed: set[str] = set()  # closers known not to occur again: "\\[" × 20000 stays linear
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "[(":
            close = "\\]" if text[i + 1] == "[" else "\\)"
            j = -1 if close in unclosed else text.find(close, i + 2)
            if j < 0:
                unclosed.add(close)
                i += 2
                continue
            out.append((i, j + 2))
            i = j + 2
        elif c == "\\":
            i += 2
        elif c == "$":
            if text.startswith("$$", i):
                j = -1 if "$$" in unclosed else text.find("$$", i + 2)
                if j < 0:
                    unclosed.add("$$")
                    i += 2
                    continue
                out.append((i, j + 2))
                i = j + 2
                continue
            j = i + 1
            while j < n and text[j] != "\n" and not (text[j] == "$" and text[j - 1] != "\\"):
                j += 1
            inner = text[i + 1:j]
            if j >= n or text[j] != "$" or (inner[:1].isdigit() and _PROSE_WORD.search(
                    re.sub(r"\\(?:text|mathrm|mbox)\s*\{[^{}]*\}", "", inner))):
                i += 1  # currency
                continue
            out.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return out


_BOLD = re.compile(r"(?<![\w)\]])\*\*|\*\*(?![\w(])|__")  # markdown bold, not x**2


def _skeleton(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text with each maths region blanked to NULs (same length, so offsets hold) and bold
    markers blanked to spaces."""
    regions = _math_regions(text)
    chars = list(_BOLD.sub(lambda m: " " * len(m.group(0)), text))
    for a, b in regions:
        chars[a:b] = "\0" * (b - a)
        # a display block that ends its sentence ("….$$ Therefore …"): the space after it ends it too
        if text.startswith(("$$", "\\["), a) and b < len(text) and text[b] in " \t":
            inner = text[a + 2:b - 2].rstrip()
            after = text[b:].lstrip()[:1]
            if inner.endswith(".") or after.isupper():
                chars[b] = "\n"
    return "".join(chars), regions


_TOK = re.compile(r"""
 (?P<ph>\x00+)
|(?P<num>\d+(?:[.,]\d+)*|(?<![\w.])\.\d+)
|(?P<cmd>\\[a-zA-Z]+|\\[{}%$|])
|(?P<word>[^\W\d_²³¹]{2,})
|(?P<letter>[^\W\d_²³¹])
|(?P<op>[-+*/^=<>×÷·±≤≥≠≈√π∞°%!'_|−–²³])
|(?P<open>[(\[{])
|(?P<close>[)\]}])
|(?P<sp>\s+)
|(?P<punct>[,;:])
|(?P<other>.)
""", re.X | re.S)
_TEXT_CMDS = {"\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mbox", "\\textnormal", "\\mathbf", "\\operatorname"}
_FUNC_WORDS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi"}
_NOT_MATH_CMDS = {"\\quad", "\\qquad", "\\text", "\\textbf", "\\mbox", "\\newline", "\\\\"}
_MARKERS = {
    "is", "are", "was", "were", "be", "equals", "equal", "equaled", "gives", "give", "get", "gets", "got",
    "obtain", "obtains", "obtained", "yields", "yield", "makes", "make", "made", "becomes", "become",
    "total", "totals", "remains", "remain", "left", "has", "have", "had", "costs", "cost", "pays", "paid",
    "earns", "earned", "needs", "need", "takes", "took", "sold", "spent", "saved", "weighs", "contains",
    "then", "so", "thus", "therefore", "hence", "answer", "result", "altogether", "overall", "exactly",
    "approximately", "about", "around", "buys", "bought", "owns", "collects", "collected", "wins", "scored",
    "means", "mean", "represents", "comes", "amounts", "worth", "reaches", "reached", "value", "holds",
}
# words that start a new clause, and the first words that make a clause subordinate (its maths is
# a circumstance, not the result: "found in 2 steps", "In 2019, …", "since 3 + 4 = 7")
_CONNECTIVES = {"so", "then", "thus", "therefore", "hence", "but", "because", "since", "which", "where",
                "while", "when", "whereas", "if", "after", "before", "using", "given", "found", "taking",
                "assuming", "via"}
_SUBORDINATE = (_CONNECTIVES - {"so", "then", "thus", "therefore", "hence", "but", "which", "where"}) | {
    "as", "in", "for", "of", "at", "by", "with", "from", "per", "between", "on"}
_HEDGE = re.compile(r"(?i)\b(?:might|maybe|perhaps|possibly|probably|could\s+(?:also\s+)?be|either|not\s+sure|unsure|"
                    r"likely|or\s+so)\b")
_NEGATIONS = {"not", "isn", "isnt", "never", "no", "nor", "neither", "cannot", "can't", "won't"}
_LIST_GAP = re.compile(r"\s*(?:,|;)?\s*(?:(?:and|or)\s+)?|\s*,?\s*\\q?quad\s*")
_CHECK = re.compile(
    r"(?i)^\W*(?:(?:to|let(?:'s| us| me)|now|we can|i(?:'ll| will)|and|as a)\s+)?(?:check(?:ing)?(?=\s*[:：—-]|\s+(?:our|my|the|this|that|it|by|whether|if)\b|\s*$)|verif(?:y|ying|ied|ication)|double[- ]check(?:ing)?|sanity[- ]check|indeed|"
    r"confirm(?:ing|ation)?|substitut(?:e|ing)\s+back|plug(?:ging)?\s+(?:\w+\s+)?back|test(?:ing)?:|proof|"
    r"note|remark|explanation|hint|p\.?\s?s\.?|let(?:'s| us| me)\s+(?:check|verify|double[- ]check|confirm))\b"
    r"|checks out|✓|✔|\bverified\b|\bconfirms?\b|\bas expected\b")
_SETUP = re.compile(
    r"(?i)\?\s*$|\b(?:how many|how much|what is|what are|what was|we need to|we want to|we are asked|"
    r"the question|(?:is|are|was) asked|asks? (?:for|us|how)|we are given|suppose)\b|^\W*let\s+[a-z]\b")
# the closing lines of a chatty answer: pleasantries and offers ("Hope this helps!", "Feel free to
# ask about step 2.", "I can also show it for 5 people.") state no result
_CLOSING = re.compile(
    r"(?i)^\W*(?:(?:and|also|again|so)\s+)?(?:i\s+hope|hope\s+(?:this|that|it|you)|feel\s+free|let\s+me\s+know|"
    r"(?:please\s+)?(?:do\s+not|don'?t)\s+hesitate|if\s+you\s+(?:have|need|want|would\s+like|'d\s+like)\s+"
    r"(?:any|more|further|other|another|me|help|to)\b|would\s+you\s+like|do\s+you\s+want|want\s+me\s+to|shall\s+i|"
    r"is\s+there\s+anything|(?:i'?m\s+)?(?:happy|glad)\s+to\s+help|glad\s+i\s+could|good\s+luck|"
    r"have\s+a\s+(?:great|nice|good|wonderful)|thanks?\b|thank\s+you|any\s+(?:other|more|further)\s+questions|"
    r"i\s+(?:can|could)\s+also)")
_TICK = re.compile(r"\W*(?:✓|✔|✅|correct|yes|checks out)\W*", re.I)
_SENT_END = re.compile(r"\.(?=\s|$)|[!?。！？](?=\s|$)|\n\s*\n|\n")
_LIST_PREFIX = re.compile(r"(?m)^[ \t]*(?:\d{1,2}[.)]|[-*•]|#{1,6}|step\s+\d+\s*[:.)-]?|\(\w\))[ \t]+", re.I)


def _tokens(skel: str, a: int, b: int):
    return [(m.lastgroup, m.start(), m.end()) for m in _TOK.finditer(skel, a, b)]


def _runs(skel: str, a: int, b: int, units: bool = True) -> tuple[list[tuple[int, int]], list]:
    """Maths runs in skel[a:b] (a run: numbers, delimited maths, operators, LaTeX commands,
    brackets, and single letters next to an operator or a number; with `units`, a known unit word
    after a number) and the token list."""
    toks = _tokens(skel, a, b)
    runs, i, n = [], 0, len(toks)
    while i < n:
        kind, s, e = toks[i]
        # "AZYUK2A", "it's": part of a word
        # (a number right after CJK text is not glued: "小明有4个苹果")
        glued = i > 0 and toks[i - 1][2] == s and (
            (toks[i - 1][0] in ("word", "letter") and not _CJK.match(skel, s - 1)) or (
                skel[toks[i - 1][1]:s] == "'" and i > 1 and toks[i - 2][0] in ("word", "letter")))
        if kind == "word" and skel[s:e].lower() in _FUNC_WORDS:
            kind = "cmd"
        if (glued or kind not in ("ph", "num", "cmd", "letter", "op", "open")
                or (kind == "cmd" and skel[s:e] in _NOT_MATH_CMDS) or (kind == "op" and skel[s:e] not in "-+−√π∞±")):
            i += 1
            continue
        j, depth, last, mathy, letters, ops = i, 0, None, False, 0, False
        while j < n:
            k, ts, te = toks[j]
            text = skel[ts:te]
            if k == "word" and text.lower() in _FUNC_WORDS:
                k = "cmd"  # sqrt(2), 2pi, log(8)
            if k == "cmd" and text == "\\begin":  # a whole environment (a matrix) is one maths item
                env = re.match(r"\{(\w+\*?)\}", skel[te:b])
                close = skel.find("\\end{" + env.group(1) + "}", te, b) if env else -1
                if close < 0:
                    break
                close += len(env.group(1)) + 6
                while j + 1 < n and toks[j + 1][1] < close:
                    j += 1
                mathy, last = True, j
                j += 1
                continue
            if k == "cmd" and text in _TEXT_CMDS and te < b and skel[te:te + 1] == "{":
                close = _close_brace(skel, te, b)
                if close < 0:
                    break
                # swallow the \text{...} group; skip the tokens inside it
                while j + 1 < n and toks[j + 1][1] <= close:
                    j += 1
                last = j
                j += 1
                continue
            if k in ("num", "ph"):
                mathy = True
            elif k == "cmd":
                mathy = mathy or text not in _NOT_MATH_CMDS
            elif k == "letter":
                letters += 1
                mathy = mathy or text == "π"
            elif k == "op":
                ops = ops or text not in "'_"
                mathy = mathy or text == "∞"  # "the sum is ∞" (and "π", a letter, below)
            elif k == "open":
                depth += 1
            elif k == "close":
                depth -= 1
                if depth < 0:
                    break
            elif k == "punct" and (depth > 0 or (text == ":" and last is not None and toks[last][0] == "num"
                                                 and j + 1 < n and toks[j + 1][0] == "num")):
                pass  # a comma inside brackets, or a ratio 2:3
            elif k == "word" and text.lower() in _PCT_WORDS and last is not None and toks[last][0] in ("num", "sp"):
                pass
            elif units and k == "word" and last is not None and toks[last][0] in ("num", "ph") and (
                    u_end := _prose_unit(skel, ts, b)):
                # "3 minutes", "12 square feet", "60 miles per hour": a known unit ends the run
                while j + 1 < n and toks[j + 1][1] < u_end:
                    j += 1
                last = j
                break
            elif k == "sp":
                j += 1
                continue
            else:
                break
            last = j
            j += 1
        if last is not None and (mathy or (letters and ops)):
            s0, e0 = toks[i][1], toks[last][2]
            runs.append(_trim(skel, s0, e0))
        i = max(j, i + 1)
    return [r for r in runs if r[1] > r[0]], toks


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_UNIT_PHRASE = re.compile(r"(?:(?:square|sq|cubic|cu)\.?\s+)?[A-Za-z]+(?:\s*(?:/|\bper\b)\s*[A-Za-z]+)?"
                          r"(?:\s*\^\s*\{?[23]\}?|[²³])?")
_LETTERS = re.compile(r"[A-Za-z]+")


def _prose_unit(skel: str, i: int, end: int) -> int:
    """End of a known unit written in prose at skel[i] ("minutes", "square feet", "km/h"), or 0.
    "in" is a preposition here, not inches."""
    m = _UNIT_PHRASE.match(skel, i, end)
    w = _LETTERS.match(skel, i, end)
    if not m or not w:
        return 0
    for stop in (m.end(), w.end()):
        word = skel[i:stop]
        if word.lower() != "in" and _unit_key(word):
            return stop
    return 0


def _close_brace(s: str, i: int, end: int) -> int:
    """Index of the `}` closing the `{` at s[i], searching no further than end; -1 if none."""
    depth, j = 0, i
    while j < end:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _trim(skel: str, s: int, e: int) -> tuple[int, int]:
    """Drop a run's dangling operators and unbalanced brackets at either end."""
    while e > s and skel[e - 1] in " =+*/^<>,;:-–·×÷\t":
        e -= 1
    while s < e and skel[s] in " =*/^<>,;:\t+":
        s += 1
    for _ in range(8):
        seg = skel[s:e]
        opens = sum(seg.count(c) for c in "([{")
        closes = sum(seg.count(c) for c in ")]}")
        if closes > opens and seg and seg[-1] in ")]}":
            e -= 1
        elif opens > closes and seg and seg[-1] in "([{":
            e -= 1
        elif opens > closes and seg and seg[0] in "([{":
            s += 1
        else:
            break
        while e > s and skel[e - 1] in " =+*/^<>,;:-":
            e -= 1
    return s, e


def _sentences(skel: str, a: int, b: int) -> list[tuple[int, int]]:
    out, start = [], a
    for m in _SENT_END.finditer(skel, a, b):
        if m.start() > start:
            out.append((start, m.start()))
        start = m.end()
    if b > start:
        out.append((start, b))
    return [(s, e) for s, e in out if skel[s:e].strip()]


_MAX_SENTENCE = 3000  # a longer "sentence" is read at its end (after a phrase: at its start)


def _pick(text: str, skel: str, a: int, b: int, phrase: bool, units: bool = True) -> list[tuple[int, int]] | None:
    """The maths a sentence (skel[a:b]) commits to. phrase=True: the text after "the answer is"."""
    if b - a > _MAX_SENTENCE:
        a, b = (a, a + _MAX_SENTENCE) if phrase else (b - _MAX_SENTENCE, b)
    runs, toks = _runs(skel, a, b, units)
    if not runs:
        return None
    # runs joined by ",", "and", "or", ";" are one list answer ("2 and 3", "x = 1, y = 2")
    def joinable(r) -> bool:
        """A list item: no "=", or a simple assignment (`x = 3`); `3n = 12 and n = 4` are steps."""
        inner = normalize_answer(text[r[0]:r[1]])
        if "=" not in inner:
            return True
        label, rest = _split_label(inner)
        return label is not None and "=" not in rest

    joined = [list(runs[0])]
    last_ok = len(runs) > 1 and joinable(runs[0])  # a group joins on while its items are list items
    for s, e in runs[1:]:
        ok, prev_ok = joinable((s, e)), last_ok
        last_ok = ok
        if not (prev_ok and ok):
            joined.append([s, e])
            continue
        gap = skel[joined[-1][1]:s]
        before = re.findall(r"[^\W\d_]+", skel[max(a, joined[-1][0] - 24):joined[-1][0]])
        # "In 2019, 5000 people": an introductory phrase, not a list
        intro = gap.strip() in (",", ";") and before and before[-1].lower() in _SUBORDINATE
        if _LIST_GAP.fullmatch(gap) and gap.strip() and not intro:
            joined[-1][1] = e
        else:
            joined.append([s, e])
    # clauses: split at , ; : and connective words outside the runs
    run_starts = [r[0] for r in joined]
    bounds, markers, word_pos, word_txt = [a], [], [], []
    for kind, s, e in toks:
        k = bisect.bisect_right(run_starts, s) - 1
        if k >= 0 and s < joined[k][1]:
            continue  # inside a run
        w = skel[s:e].lower()
        if kind == "punct" or (kind == "op" and w in "=≈"):
            if kind == "punct":
                bounds.append(e)
            markers.append(s)
        elif kind == "word":
            if w in _CONNECTIVES:
                bounds.append(s)
            if w in _MARKERS:
                markers.append(s)
            word_pos.append(s)
            word_txt.append(w)

    def clause_of(pos: int) -> int:
        return bisect.bisect_right(bounds, pos) - 1

    def words_between(lo: int, hi: int) -> list[str]:
        return word_txt[bisect.bisect_left(word_pos, lo):bisect.bisect_left(word_pos, hi)]

    clause_info: dict[int, tuple[bool, bool]] = {}  # clause -> (subordinate, check)

    def about(c: int) -> tuple[bool, bool]:
        if c not in clause_info:
            c_start, c_end = bounds[c], (bounds[c + 1] if c + 1 < len(bounds) else b)
            first = words_between(c_start, c_end)[:1]
            clause_text = text[c_start:c_end]
            clause_info[c] = (bool(first) and first[0] in _SUBORDINATE,
                              bool(_CHECK.search(clause_text)) or "check" in clause_text.lower())
        return clause_info[c]

    info = []  # (clause index, after a marker in its clause, subordinate clause, excluded)
    by_clause: dict[int, list] = {}
    prev_end = a
    for s, e in joined:
        c = clause_of(s)
        c_start = bounds[c]
        subordinate, check = about(c)
        near = words_between(max(c_start, prev_end), s)[-2:]
        prev_end = e
        negated = bool(set(near) & _NEGATIONS)  # "it is not 10, it is 12"
        marked = bisect.bisect_left(markers, s) > bisect.bisect_left(markers, c_start)
        info.append((c, marked, subordinate, check or negated))
        if not (check or negated):
            by_clause.setdefault(c, []).append((s, e))

    def best_in(clause: int) -> tuple[int, int]:
        """The first run after the clause's last marker that precedes a run; else its first run."""
        rs = by_clause[clause]
        lo, hi = bisect.bisect_left(markers, bounds[clause]), bisect.bisect_left(markers, rs[-1][0])
        if hi <= lo:
            return rs[0]
        after = [r for r in rs if r[0] > markers[hi - 1]]
        if len(after) > 1 and all("=" in text[r[0]:r[1]] for r in after):
            return after[-1]  # "so 3n = 12 and n = 4": steps of a derivation, the last is the result
        return after[0]

    cands = [x for x in info if not x[3]]
    if not cands:
        return None
    if phrase:  # the first clause with maths after the phrase
        choice = best_in(cands[0][0])
    else:
        main = [x for x in cands if not x[2]] or cands
        marked = [x for x in main if x[1]]
        if marked:  # the last main clause that states a result
            choice = best_in(marked[-1][0])
        elif len(main) > 1 and len({x[0] for x in main}) > 1 and any(x[2] for x in cands):
            choice = best_in(main[-1][0])
        else:
            choice = best_in(main[0][0]) if any(x[2] for x in info) else best_in(main[-1][0])
    # "probably 2, but it might be 3": a hedge between values is all of them (a list: never one number)
    if _HEDGE.search(text[a:b]):
        offered = [best_in(c) for c in sorted({x[0] for x in cands if not x[2]})][:_MAX_ELEMENTS]
        for h in _HEDGE.finditer(text, a, b):  # "7 (or maybe 8)": the value right after a hedge word too
            nxt = next((r for r in by_clause.get(clause_of(h.end()), []) if r[0] >= h.end()), None)
            if nxt and nxt not in offered and len(offered) < _MAX_ELEMENTS:
                offered.append(nxt)
        if len({_key(text[r[0]:r[1]]) for r in offered}) > 1:
            return offered
    return [choice]


def _span_text(text: str, spans: list[tuple[int, int]]) -> str:
    return ", ".join(_BOLD.sub("", text[a:b]).strip() for a, b in spans)  # "**64** cubic cm"


_PHRASES = [
    re.compile(r"(?i)\bfinal\s+answer\s*(?:is\b|would\s+be\b|will\s+be\b)?\s*[:：]?"),
    re.compile(r"(?i)\b(?:the\s+)?(?:correct\s+|final\s+)?answer\s+(?:is|would\s+be|should\s+be|will\s+be)\b\s*[:：]?"),
    re.compile(r"(?im)^[ \t>#*]*answer\s*[*]*\s*[:：]|^[ \t>#*]*answer[ \t]+(?=\$|\\\[|\\\()|\bthe\s+answer\s*[:：]"),
    re.compile(r"####"),
    re.compile(r"(?:最终)?答案\s*(?:是|为|[:：])"),
]
_CHECK_BEFORE = re.compile(r"(?i)(?:check|verify|confirm|test)\w*\W+(?:\w+\W+){0,2}$")


def _last_phrase(text: str):
    best = None
    for pat in _PHRASES:
        for m in pat.finditer(text):
            if _CHECK_BEFORE.search(text[max(0, m.start() - 30):m.start()]):
                continue  # "let me check my answer: …"
            if best is None or m.start() > best.start():
                best = m
    return best


def _phrase_answer(text: str, skel: str, m, units: bool = True) -> tuple[str | None, str]:
    """(the committed maths after the phrase, or None; the plain phrase text up to its sentence end)."""
    a = m.end()
    while a < len(skel) and (skel[a].isspace() or skel[a] in ":：*"):
        a += 1
    sents = _sentences(skel, a, len(skel))
    if not sents:
        return None, ""
    s, e = sents[0]
    plain = text[s:e].strip().strip("*").strip()
    got = _pick(text, skel, s, e, phrase=True, units=units)
    return (_span_text(text, got) if got else None), plain


def extract_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is / final answer: / Answer: / #### / 答案是": the maths its
    sentence commits to, else the plain phrase up to the end of its sentence ("London")."""
    text = undouble_backslashes(text)
    m = _last_phrase(text)
    if m is None:
        return None
    skel, _ = _skeleton(text)
    got, plain = _phrase_answer(text, skel, m, units=False)
    return got or plain or None


# a sentence that takes the answer back: "Wait, that's wrong", "Oops, I made a mistake", "Correction:"
_RETRACT = re.compile(
    r"(?i)\W*(?:(?:wait|hmm+|oh|oops|no|actually|but|sorry)\b[\s,.!—–-]*)*(?:(?:that|this|it)(?:'s|\s+is|\s+was)\s+"
    r"(?:wrong|incorrect|not\s+(?:right|correct))\b|i\s+made\s+an?\s+(?:\w+\s+)?(?:mistake|error)\b|my\s+mistake\b|"
    r"i\s+miscalculated\b|correction\s*:|let\s+me\s+(?:redo|recompute|recalculate|correct)\b)")


def _retraction(skel: str, a: int) -> int | None:
    """Start of the first sentence after skel[a] that retracts what came before, or None."""
    for s, e in _sentences(skel, a, len(skel)):
        if _RETRACT.match(skel, s, e):
            return s
    return None


def _last_line_answer(text: str, skel: str, a: int = 0, units: bool = True) -> str | None:
    """The last sentence that states a result (not a check, a note, a restated question, a
    question or a closing pleasantry), and in it the maths its main clause commits to."""
    sents = _sentences(skel, a, len(skel))
    ticked = False  # "… = 14. ✓": a sentence followed by a lone tick was a check
    for s, e in reversed(sents):
        sentence = text[s:e]
        was_ticked, ticked = ticked, bool(_TICK.fullmatch(sentence))
        if (ticked or was_ticked or _CHECK.search(sentence) or _SETUP.search(sentence)
                or _CLOSING.search(sentence) or text[e:e + 1] in ("?", "？")):
            continue  # a check, a restated question, a pleasantry, a question
        got = _pick(text, skel, s, e, phrase=False, units=units)
        if got:
            return _span_text(text, got)
    return None


def _box_answer(content: str) -> str:
    """A box that holds a sentence (`\\boxed{\\text{The answer is } 4}`): what its answer phrase
    commits to."""
    if not re.search(r"(?i)answer|答案", content):
        return content
    inner = _unwrap(content)
    m = _last_phrase(inner)
    if m is None:
        return content
    got, _ = _phrase_answer(inner, _skeleton(inner)[0], m)
    return got or content


@dataclass
class Extraction:
    answer: str | None
    how: str                       # "boxed" | "boxes" | "phrase" | "last_line" | "whole" | "none"
    all_boxes: list = field(default_factory=list)  # every distinct box, when the answer is boxed
    boxes: int = 0                 # how many of them the answer is made of


def extract(response: str, *, think: bool = True, fallback: str = "last_line", units: bool = True) -> Extraction:
    """The final answer a response commits to (see the module docstring); `units`: a known unit
    after a number in prose is part of the answer ("3 minutes"), so that it can be compared."""
    text = _answer_part(response, think)
    group, every = _final_boxes(text)
    group = [_box_answer(g) for g in group]
    if group:
        return Extraction(", ".join(group), "boxed" if len(group) == 1 else "boxes", every, len(group))
    text = _LIST_PREFIX.sub(lambda m: " " * len(m.group(0)), text)
    skel, _ = _skeleton(text)
    m = _last_phrase(text)
    if m is not None:
        retracted = _retraction(skel, m.end())
        if retracted is not None:  # "The answer is 16. Wait, that's wrong: … it should be 15."
            later = _last_line_answer(text, skel, retracted, units) if fallback == "last_line" else None
            return Extraction(later, "last_line") if later else Extraction(None, "none")
        got, plain = _phrase_answer(text, skel, m, units)
        if got:
            return Extraction(got, "phrase")
        later = _last_line_answer(text, skel, m.end(), units) if fallback == "last_line" else None
        if later:
            return Extraction(later, "phrase")
        if plain:
            return Extraction(plain, "phrase")
    if fallback == "last_line":
        got = _last_line_answer(text, skel, units=units)
        if got:
            return Extraction(got, "last_line")
        bare = text.strip()
        if bare and "\n" not in bare and len(bare.split()) <= 3 and not re.search(r"[.!?]$", bare):
            return Extraction(bare, "whole")  # a bare answer: "Evelyn", "yes", "\text{(C)}"
    return Extraction(None, "none")


def extract_answer(response: str) -> str | None:
    """The final answer in a response (its `<think>` block is not looked at): the last boxed
    answer, else the last answer phrase, else the last stated result (a unit word after it in
    prose is left out: "3 minutes" → "3")."""
    return extract(response, units=False).answer


def reference_answer(reference: str, units: bool = True) -> str:
    """A reference may itself be a worked solution: its boxed answer(s), GSM8K's `#### 72`, or —
    for prose — the answer it states; else the reference as it is."""
    reference = undouble_backslashes(str(reference))
    boxes = _dedupe(b[2] for b in _boxes(reference))
    if boxes:
        return ", ".join(boxes)
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    ref = reference.strip()
    if _last_phrase(ref) is not None or len(re.findall(
            r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+(?:\{[^{}]*\})?", "", ref))) >= 6:
        got = extract(ref, think=False, units=units).answer  # a worked solution in prose
        if got:
            return got
    return ref


