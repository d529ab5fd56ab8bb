"""Rule verifiers that need no maths: multiple choice, exact match, regex.

Registered source types:
  multiple_choice — the response's option letter vs the reference (a letter, or the option text
                    when `sample.meta["options"]` lists the options);
  exact           — the response (or its extracted final answer) equals the reference text;
  regex           — the response matches a pattern (the `pattern` option, else the reference).
"""
from __future__ import annotations

import functools
import re
import unicodedata

import regex

from megatron_ernie.errors import ConfigError
from megatron_ernie.rewards.math_verify import extract_answer, extract_answer_phrase, extract_boxed
from megatron_ernie.rewards.text import strip_think
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample, register_source

LETTERS = "ABCDEFGHIJ"

# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^\s*[\(\[]?([A-Ja-j])[\)\]]?\s*[.:：、)]?\s*")


def options_by_letter(options) -> dict[str, str]:
    """`meta["options"]` as {letter: text}: a list/tuple (A, B, … in order) or a dict keyed by
    letter. A leading "A. " / "(A)" label inside the text is dropped."""
    if options is None:
        return {}
    if isinstance(options, dict):
        items = [(str(k).strip().upper(), str(v)) for k, v in options.items()]
    elif isinstance(options, (list, tuple)):
        if len(options) > len(LETTERS):
            raise ValueError(f"{len(options)} options; at most {len(LETTERS)} (A–J) supported")
        items = list(zip(LETTERS, map(str, options)))
    else:
        raise ValueError(f"meta['options'] must be a list or a dict, got {type(options).__name__}")
    out = {}
    for letter, text in items:
        if len(letter) != 1 or letter not in LETTERS:
            raise ValueError(f"option key {letter!r} is not a letter A–J")
        m = _LABEL.match(text)
        if m and m.group(1).upper() == letter and len(text) > m.end():
            text = text[m.end():]
        out[letter] = text
    return out


def _text_key(s: str) -> str:
    """Case-, space- and punctuation-insensitive form of an option text."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return "".join(c for c in s if c.isalnum())


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def _single_letter(text: str, letters: str) -> str | None:
    """"B", "(b)", "B.", "\\text{B}", "**B**" → "B"; anything longer → None."""
    if len(text) > 40:  # a bare letter is short; also keeps the regex off long inputs
        return None
    t = re.sub(r"\\text\s*\{([^}]*)\}", r"\1", text)
    t = t.strip().strip("*$ ").strip()
    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:。)]?", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


_PROSE_NEXT = re.compile(r"\s+[a-z]")


def extract_choice(response: str, letters: str = LETTERS) -> tuple[str | None, str]:
    """(letter, how) where how is "boxed" | "phrase" | "bold" | "whole" | "standalone" | "none".

    A standalone capital followed by a lowercase word ("A good start", "I think") is prose,
    not an answer, and is skipped; an answer letter must be uppercase outside a box/phrase."""
    boxed = extract_boxed(response)
    if boxed is not None:
        letter = _single_letter(boxed, letters)
        if letter:
            return letter, "boxed"
    cls = _letter_class(letters)
    # possessive runs (*+): a long stretch of spaces after "answer" must not backtrack
    phrase = re.compile(
        r"(?i:answer|option|choice)(?:\s++is)?[\s:：*(\[]*+(?:(?i:option|choice)[\s*(\[]*+)?"
        rf"({cls})(?![A-Za-z0-9])"
        rf"|答案[\s:：是为选项(（]*+({cls})(?![A-Za-z0-9])")
    found = [m.group(1) or m.group(2) for m in phrase.finditer(response)]
    if found:
        return found[-1], "phrase"
    found = re.findall(rf"\*\*\s*[\(\[]?({cls})[\)\]]?[.:)]?\s*\*\*", response)
    if found:
        return found[-1], "bold"
    whole = _single_letter(response, letters)
    if whole:
        return whole, "whole"
    last = None
    for m in re.finditer(rf"(?<![A-Za-z0-9\\'])({cls})(?![A-Za-z0-9'])", response):
        if _PROSE_NEXT.match(response, m.end()):
            continue
        last = m.group(1)
    return (last, "standalone") if last else (None, "none")


def _choice_by_text(response: str, options: dict[str, str]) -> str | None:
    """No letter given: a final answer that is exactly one option's text picks that option."""
    keys = {_text_key(t): letter for letter, t in options.items()}
    for cand in (extract_boxed(response), extract_answer_phrase(response), response):
        if cand and _text_key(cand) in keys:
            return keys[_text_key(cand)]
    return None


def resolve_reference_choice(reference: str, options: dict[str, str]) -> str | None:
    """The reference as a letter: "B", "(b)", "B. Paris", or an option's text."""
    letter = _single_letter(reference, "".join(options) or LETTERS)
    if letter:
        return letter
    key = _text_key(reference)
    for letter, text in options.items():
        if _text_key(text) == key:
            return letter
    m = _LABEL.match(reference)
    if m and m.group(1).upper() in options and _text_key(reference[m.end():]) == _text_key(options[m.group(1).upper()]):
        return m.group(1).upper()
    return None


@register_source("multiple_choice")
class MultipleChoiceVerifier(PerSampleSource):
    """Reward 1 if the chosen option letter is the reference's. details: extracted, reference, how."""

    name = "multiple_choice"

    def __init__(self, letters: str = LETTERS, strip_think: bool = True, concurrency: int = 1):
        letters = letters.upper()
        if not letters or any(c not in LETTERS for c in letters):
            raise ConfigError(f"letters={letters!r}: use a subset of {LETTERS}")
        self.letters = letters
        self.strip_think = strip_think
        self.concurrency = concurrency

    def score_one(self, sample: RewardSample) -> RewardResult:
        try:
            options = options_by_letter(sample.meta.get("options"))
        except ValueError as e:
            return RewardResult.failure(self.name, f"bad options: {e}")
        if sample.reference is None or not str(sample.reference).strip():
            return RewardResult.failure(self.name, "missing reference answer")
        ref = resolve_reference_choice(str(sample.reference), options)
        if ref is None:
            return RewardResult.failure(self.name, f"reference {str(sample.reference)[:100]!r} is neither an option letter "
                                                   "nor the text of an option in meta['options']")
        letters = "".join(c for c in self.letters if not options or c in options)
        text = strip_think(sample.response) if self.strip_think else sample.response
        got, how = extract_choice(text, letters)
        if got is None and options:
            got = _choice_by_text(text, options)
            how = "option_text" if got else how
        details = {"extracted": got, "reference": ref, "how": how}
        if got is None:
            return RewardResult(0.0, self.name, reason="no answer found", details=details)
        return RewardResult(float(got == ref), self.name, reason="" if got == ref else "wrong option",
                            details=details)


# ---------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------

def normalize_text(s: str, *, case_sensitive: bool = False, normalize_whitespace: bool = True,
                   strip_punctuation: bool = False) -> str:
    s = unicodedata.normalize("NFKC", s)
    if strip_punctuation:
        s = "".join(c for c in s if not unicodedata.category(c).startswith("P"))
    if normalize_whitespace:
        s = " ".join(s.split())
    return s if case_sensitive else s.casefold()


@register_source("exact")
class ExactMatchVerifier(PerSampleSource):
    """Reward 1 if the response equals the reference after normalisation.

    extract_answer: compare the final answer (boxed / "the answer is" / last number) instead of
    the whole response, falling back to the whole response when none is found.
    details: compared (the normalised response side), reference (normalised)."""

    name = "exact"

    def __init__(self, case_sensitive: bool = False, normalize_whitespace: bool = True,
                 strip_punctuation: bool = False, extract_answer: bool = False,
                 strip_think: bool = True, concurrency: int = 1):
        self.norm = dict(case_sensitive=case_sensitive, normalize_whitespace=normalize_whitespace,
                         strip_punctuation=strip_punctuation)
        self.extract_answer = extract_answer
        self.strip_think = strip_think
        self.concurrency = concurrency

    def score_one(self, sample: RewardSample) -> RewardResult:
        if sample.reference is None:
            return RewardResult.failure(self.name, "missing reference")
        text = strip_think(sample.response) if self.strip_think else sample.response
        if self.extract_answer:
            text = extract_answer(text) or text
        got = normalize_text(text, **self.norm)
        ref = normalize_text(str(sample.reference), **self.norm)
        ok = got == ref
        return RewardResult(float(ok), self.name, reason="" if ok else "no exact match",
                            details={"compared": got[:500], "reference": ref[:500]})


# ---------------------------------------------------------------------------------------------
# Regex
# ---------------------------------------------------------------------------------------------

_MODES = ("search", "match", "fullmatch")


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, flags: int):
    return regex.compile(pattern, flags)


@register_source("regex")
class RegexVerifier(PerSampleSource):
    """Reward 1 if the response matches the pattern.

    pattern: one pattern for every sample (a format check); when None, each sample's reference is
    its pattern. mode: "search" (anywhere), "match" (at the start), "fullmatch" (whole text,
    surrounding whitespace ignored). Matching runs under `timeout_s` (the `regex` package's
    timeout, which `re` lacks): a catastrophic-backtracking pattern, from data or a pathological
    response, fails its sample with the reason instead of stalling the batch.
    details: pattern, mode, matched (the matched text, truncated)."""

    name = "regex"

    def __init__(self, pattern: str | None = None, mode: str = "search", ignore_case: bool = False,
                 dotall: bool = False, multiline: bool = False, strip_think: bool = True,
                 timeout_s: float = 1.0, concurrency: int = 1):
        if mode not in _MODES:
            raise ConfigError(f"mode={mode!r}: use one of {', '.join(_MODES)}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.flags = (regex.IGNORECASE if ignore_case else 0) | (regex.DOTALL if dotall else 0) \
            | (regex.MULTILINE if multiline else 0)
        self.timeout_s = float(timeout_s)
        if pattern is not None:
            _compile(pattern, self.flags)  # a bad configured pattern is a config error: fail now
        self.pattern = pattern
        self.mode = mode
        self.strip_think = strip_think
        self.concurrency = concurrency

    def score_one(self, sample: RewardSample) -> RewardResult:
        pattern = self.pattern if self.pattern is not None else sample.reference
        if pattern is None or pattern == "":
            return RewardResult.failure(self.name, "no pattern: set the `pattern` option or a reference")
        try:
            rx = _compile(str(pattern), self.flags)
        except regex.error as e:
            return RewardResult.failure(self.name, f"bad pattern {pattern!r}: {e}")
        text = strip_think(sample.response) if self.strip_think else sample.response
        if self.mode == "fullmatch":
            text = text.strip()
        try:
            m = getattr(rx, self.mode)(text, timeout=self.timeout_s)
        except TimeoutError:
            return RewardResult.failure(self.name, f"regex timed out after {self.timeout_s:g}s", pattern=str(pattern))
        details = {"pattern": str(pattern), "mode": self.mode, "matched": m.group(0)[:200] if m else None}
        return RewardResult(float(m is not None), self.name, reason="" if m else "no match", details=details)
