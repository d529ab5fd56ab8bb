r"""LLM judges: a generation backend reads the response and writes a verdict or scores.

- `RLLMJudge` (type `rllm`): reference-guided LLM-as-a-judge. The judge sees the question, the
  reference answer and the response's final answer (its `<think>` block stripped, long answers
  cut to their tail) and ends with `Verdict: CORRECT` or `Verdict: INCORRECT`; reward 1 / 0.
- `GRMJudge` (type `grm`): generative reward model. The judge scores each configured dimension
  (helpfulness, correctness, ...) from 1 to 10, as `name: score` lines or a JSON object; the
  reward is the weighted mean mapped to [0, 1] ((mean - 1) / 9), per-dimension scores in details.

Scoring a batch is one `backend.generate` call (plus one per retry round). Nothing raises out of
`score`: a sample without what its template needs, a backend exception, or output that does not
parse gives a failed result (reward `fallback_reward`, default 0) with a reason, counted in
`judge.stats` = {"scored", "unparsable", "errors", "invalid", "retried"}:
  scored - samples with a parsed verdict; unparsable - samples whose output never parsed;
  errors - samples failed by a backend exception; invalid - samples the template cannot take
  (e.g. rllm without a reference); retried - extra generations spent on unparsable output.

Parsing rules (both judges): `<think>...</think>` blocks of the judge are ignored (an unclosed
`<think>` drops the rest: a verdict inside unfinished reasoning is not one); markdown emphasis
(`*`, `_`, backticks, `#`) and case do not matter.
- rllm: the LAST line with a `verdict` label followed by CORRECT or INCORRECT counts (e.g.
  `**Final verdict:** correct.`); after its first label it must name exactly one of the two and no
  negation ("not correct" is ambiguous), else the output is unparsable (so is
  `Verdict: CORRECT or Verdict: INCORRECT`). Without such a line, a last non-empty line that is
  only the word counts. Free text ("the answer is correct") is never read as a verdict.
- grm: the last JSON object with the dimensions (optionally under "scores") wins; otherwise
  `name: score` lines, the last line per dimension counting. Scores may be `8`, `8.5`, `8/10`,
  `4/5` (rescaled to 10). Every dimension must be present. Out-of-range scores (outside 1..10):
  `out_of_range="reject"` (default) makes the output unparsable - a judge writing 0 or 11 did not
  follow the scale, and clamping would turn format errors into extreme rewards; "clamp" clamps.
  A JSON object or set of lines that misses a dimension does not count.
A backend exception in a retry round ends the retries; those samples stay unparsable.

Templates use `{name}` placeholders (`str.format`; write literal braces as `{{` `}}`), checked at
construction: rllm needs {question}, {reference}, {response}; grm needs {question}, {response},
{dimensions} and may use {reference}.
"""
from __future__ import annotations

import json
import math
import re
import string
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

from megatron_ernie.errors import ConfigError
from megatron_ernie.rewards.generation import GenerationBackend, build_backend, check_outputs
from megatron_ernie.rewards.text import THINK_CLOSE, THINK_OPEN, strip_think
from megatron_ernie.rewards.types import RewardResult, RewardSample, register_source

UNPARSABLE = "unparsable judge output"

RLLM_TEMPLATE = """\
You are grading a response to a question against a reference answer.
Decide only whether the response's final answer agrees with the reference answer. Ignore style, \
length and how the answer was derived; equivalent forms (such as 0.5 and 1/2) agree.

[Question]
{question}

[Reference answer]
{reference}

[Response]
{response}

Explain briefly, then end with exactly one final line, either
Verdict: CORRECT
or
Verdict: INCORRECT"""

GRM_TEMPLATE = """\
You are an impartial judge. Rate the response to the prompt below on each criterion, \
with a score from 1 (very poor) to 10 (excellent).

[Criteria]
{dimensions}

[Prompt]
{question}

[Reference answer, if any]
{reference}

[Response]
{response}

Explain briefly, then end with one line per criterion, written as `name: score` with the \
names exactly as listed above."""


# --- templates -------------------------------------------------------------------------------
class TemplateError(ConfigError):
    """A judge template with unknown, missing or malformed placeholders."""


def template_fields(template: str) -> set[str]:
    """The `{name}` placeholders of a str.format template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"judge template is malformed ({e}); write literal braces as {{{{ }}}}") from None
    fields = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise TemplateError(f"judge template placeholder {name!r} (conversion {conv!r}, format {spec!r}) "
                                "is not a plain {name}; write literal braces as {{ }}")
        fields.add(name)
    return fields


def check_template(template: str, required: set[str], optional: set[str] = frozenset()) -> str:
    if not isinstance(template, str):
        raise TemplateError(f"judge template must be a string, got {type(template).__name__}")
    fields = template_fields(template)
    unknown, missing = fields - required - set(optional), required - fields
    if unknown:
        raise TemplateError(f"judge template has unknown placeholder(s) {_braced(unknown)}; "
                            f"allowed: {_braced(required | set(optional))} (literal braces: {{{{ }}}})")
    if missing:
        raise TemplateError(f"judge template lacks required placeholder(s) {_braced(missing)}")
    return template


def _braced(names) -> str:
    return ", ".join("{" + n + "}" for n in sorted(names))


# --- preparing responses and judge outputs ---------------------------------------------------
def truncate_tail(text: str, max_chars: int | None) -> str:
    """Keep the last `max_chars` characters (a final answer sits at the end), with a marker."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = len(text) - max_chars
    return f"[... {cut} earlier characters truncated ...]\n" + text[cut:]


def _drop_reasoning(output: str) -> str:
    """A judge output without its reasoning blocks; an unclosed `<think>` drops the rest."""
    out = re.sub(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), "", output, flags=re.S)
    return out.split(THINK_OPEN, 1)[0].replace(THINK_CLOSE, "")


def _plain(text: str) -> str:
    """Markdown emphasis and headings off; verdicts and scores are read from what is left."""
    return re.sub(r"[*_`#]", "", text)


# --- rllm parsing ----------------------------------------------------------------------------
_VERDICT_LABEL = re.compile(r"\bverdict\b", re.I)
_VERDICT_WORD = re.compile(r"\b(correct|incorrect)\b", re.I)
_NEGATION = re.compile(r"\bnot\b|n't\b", re.I)
_BARE_VERDICT = re.compile(r"^\W*(correct|incorrect)\W*$", re.I)


def parse_verdict(output: str) -> bool | None:
    """True / False for CORRECT / INCORRECT; None when unparsable (see the module docstring)."""
    lines = [ln.strip() for ln in _plain(_drop_reasoning(output)).splitlines() if ln.strip()]
    verdict_lines = [rest for rest in map(_after_label, lines) if rest and _VERDICT_WORD.search(rest)]
    if verdict_lines:
        return _verdict_of(verdict_lines[-1])
    bare = _BARE_VERDICT.match(lines[-1]) if lines else None
    return bare.group(1).lower() == "correct" if bare else None


def _after_label(line: str) -> str | None:
    """The text after a line's first `verdict` label (None without one): with the first label,
    `Verdict: CORRECT or Verdict: INCORRECT` reads as contradictory, as it is."""
    m = _VERDICT_LABEL.search(line)
    return line[m.end():] if m else None


def _verdict_of(text: str) -> bool | None:
    words = {w.lower() for w in _VERDICT_WORD.findall(text)}
    if len(words) != 1 or _NEGATION.search(text):
        return None
    return words.pop() == "correct"


# --- grm parsing -----------------------------------------------------------------------------
_SCORE = re.compile(r"^\s*[\[(]?\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?")
_SCORE_LINE = re.compile(r"^[\s\-+>\d.)]*([A-Za-z][A-Za-z0-9 _\-]*?)\s*[:：=]\s*(.+)$")


def dimension_key(name: str) -> str:
    """How judge output names a dimension: `Instruction Following`, `instruction-following`,
    `instruction_following` all -> `instructionfollowing`."""
    return re.sub(r"[\s_\-]+", "", name.lower())


def parse_score(value) -> float | None:
    """`8`, `8.5`, `"8/10"`, `"4/5"` (-> 8.0), `"7 - solid"` -> a score on the 10 scale."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    m = _SCORE.match(value)
    if not m:
        return None
    score = float(m.group(1))
    if m.group(2) is not None:
        denominator = float(m.group(2))
        if denominator <= 0:
            return None
        score = score * 10.0 / denominator
    return score


def parse_scores(output: str, dimensions: Sequence[str]) -> dict[str, float] | None:
    """Raw scores per dimension (not range-checked); None when any dimension is missing."""
    text = _drop_reasoning(output)
    wanted = {dimension_key(d): d for d in dimensions}
    for scores in (_json_scores(text, wanted), _line_scores(_plain(text), wanted)):
        if scores is not None and set(scores) == set(dimensions):
            return scores
    return None


def _json_objects_from_end(text: str):
    """JSON objects in the text, the last one first (judges often think before answering)."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, ch in enumerate(text) if ch == "{"]):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _json_scores(text: str, wanted: dict[str, str]) -> dict[str, float] | None:
    for obj in _json_objects_from_end(text):
        if isinstance(obj.get("scores"), dict):
            obj = obj["scores"]
        scores = {wanted[dimension_key(k)]: parse_score(v) for k, v in obj.items()
                  if isinstance(k, str) and dimension_key(k) in wanted}
        if scores:
            return scores if None not in scores.values() else None
    return None


def _line_scores(text: str, wanted: dict[str, str]) -> dict[str, float] | None:
    scores: dict[str, float] = {}
    for line in text.splitlines():
        m = _SCORE_LINE.match(line)
        if not m or dimension_key(m.group(1)) not in wanted:
            continue
        score = parse_score(m.group(2))
        if score is not None:
            scores[wanted[dimension_key(m.group(1))]] = score   # the last line per dimension wins
    return scores or None


# --- GRM dimensions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    name: str
    weight: float
    description: str = ""


DEFAULT_DIMENSIONS = (
    Dimension("helpfulness", 0.3, "how well the response serves the user's actual need"),
    Dimension("correctness", 0.3, "factual and logical accuracy"),
    Dimension("instruction_following", 0.2, "whether every explicit instruction and constraint is met"),
    Dimension("safety", 0.1, "no harmful, dangerous or inappropriate content"),
    Dimension("style", 0.1, "clarity, organisation and appropriate length"),
)


def build_dimensions(spec) -> tuple[Dimension, ...]:
    """From None (the defaults), a list of names (equal weights), `{name: weight}`, or
    `{name: {weight: w, description: text}}`."""
    if spec is None:
        return DEFAULT_DIMENSIONS
    if isinstance(spec, Mapping):
        dims = tuple(_dimension(name, v) for name, v in spec.items())
    elif isinstance(spec, (list, tuple)):
        dims = tuple(d if isinstance(d, Dimension) else _dimension(d, 1.0) for d in spec)
    else:
        raise TypeError(f"dimensions must be a list of names or a mapping, got {type(spec).__name__}")
    _check_dimensions(dims)
    return dims


def _dimension(name, value) -> Dimension:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ConfigError(f"GRM dimension name {name!r} must be a word (letters, digits, _)")
    if isinstance(value, Mapping):
        unknown = set(value) - {"weight", "description"}
        if unknown:
            raise ConfigError(f"GRM dimension {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        return Dimension(name, float(value.get("weight", 1.0)), str(value.get("description", "")))
    return Dimension(name, float(value))


def _check_dimensions(dims: tuple[Dimension, ...]) -> None:
    if not dims:
        raise ConfigError("GRM needs at least one dimension")
    keys = [dimension_key(d.name) for d in dims]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"GRM dimensions repeat a name: {[d.name for d in dims]}")
    for d in dims:
        if not (math.isfinite(d.weight) and d.weight >= 0):
            raise ConfigError(f"GRM dimension {d.name!r}: weight must be finite and >= 0, got {d.weight}")
    if sum(d.weight for d in dims) <= 0:
        raise ConfigError("GRM dimension weights sum to 0")


# --- the judges ------------------------------------------------------------------------------
class LLMJudge:
    """Shared machinery: prompt building, one backend call per batch, retries, counting.

    `max_response_chars`: the response (after stripping its reasoning) is cut to its last this
    many characters; None keeps it whole. `retries`: extra rounds for outputs that did not parse,
    sampled at `retry_temperature` (one backend call per round). `keep_output_chars`: how much of
    the judge's raw output (its tail) goes into details["judge_output"] (0: none)."""

    name = "judge"
    required_fields: set[str] = set()
    optional_fields: set[str] = set()
    default_template = ""

    def __init__(self, backend=None, *, template: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, seed: int | None = None, retries: int = 0,
                 retry_temperature: float = 0.7, fallback_reward: float = 0.0,
                 max_response_chars: int | None = 8000, keep_output_chars: int = 1000):
        if backend is None:
            raise ConfigError(f"{type(self).__name__} needs a `backend`")
        if retries < 0 or max_new_tokens < 1:
            raise ConfigError("retries must be >= 0 and max_new_tokens >= 1")
        if retries and retry_temperature <= 0:
            raise ConfigError("retry_temperature must be > 0 (a greedy retry repeats the same output)")
        if max_response_chars is not None and max_response_chars < 1:
            raise ConfigError("max_response_chars must be >= 1 or None")
        self.template = check_template(template if template is not None else self.default_template,
                                       self.required_fields, self.optional_fields)
        self.backend: GenerationBackend = build_backend(backend)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.retries = retries
        self.retry_temperature = retry_temperature
        self.fallback_reward = float(fallback_reward)
        self.max_response_chars = max_response_chars
        self.keep_output_chars = keep_output_chars
        self._stats = dict(scored=0, unparsable=0, errors=0, invalid=0, retried=0)
        self._lock = threading.Lock()

    # --- subclass hooks ---
    def fields(self, sample: RewardSample) -> dict[str, str]:  # pragma: no cover - abstract
        """The template values for a sample; raise ValueError if the sample cannot be judged."""
        raise NotImplementedError

    def result(self, output: str) -> RewardResult | None:  # pragma: no cover - abstract
        """The scored result of a judge output; None when it does not parse."""
        raise NotImplementedError

    # --- public ---
    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def response_text(self, sample: RewardSample) -> str:
        return truncate_tail(strip_think(sample.response), self.max_response_chars)

    def build_prompt(self, sample: RewardSample) -> str:
        return self.template.format(**self.fields(sample))

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        prompts: dict[int, str] = {}
        for i, s in enumerate(samples):
            try:
                prompts[i] = self.build_prompt(s)
            except Exception as e:  # noqa: BLE001 - one bad sample must not fail the batch
                results[i] = RewardResult.failure(self.name, f"cannot build judge prompt: {e}")
                self._count("invalid")
        outputs = self._judge(prompts, results)
        for i, output in outputs.items():
            results[i] = self._unparsable(output)
        return results

    # --- internals ---
    def _judge(self, prompts: dict[int, str], results: list) -> dict[int, str]:
        """Generate and parse, with retry rounds; fills `results` and returns the outputs of the
        samples that never parsed."""
        pending, attempt = dict(prompts), 0
        outputs: dict[int, str] = {}
        while pending:
            temperature = self.temperature if attempt == 0 else self.retry_temperature
            seed = None if self.seed is None else self.seed + attempt
            generated = self._generate(list(pending.values()), temperature, seed)
            if isinstance(generated, Exception):
                if attempt == 0:
                    self._fail_backend(pending, results, generated)
                break   # a failed retry round leaves the first round's outputs unparsable
            for i, output in zip(list(pending), generated):
                parsed = self._parse(output)
                if parsed is None:
                    outputs[i] = output
                    continue
                parsed.details.update(attempts=attempt + 1, **self._raw(output))
                results[i] = parsed
                outputs.pop(i, None)
                del pending[i]
                self._count("scored")
            if attempt >= self.retries:
                break
            attempt += 1
            self._count("retried", len(pending))
        return outputs

    def _generate(self, prompts: list[str], temperature: float, seed: int | None):
        try:
            return check_outputs(prompts, self.backend.generate(prompts, max_new_tokens=self.max_new_tokens,
                                                                temperature=temperature, seed=seed))
        except Exception as e:  # noqa: BLE001 - reported per sample, never raised
            return e

    def _fail_backend(self, pending: dict, results: list, error: Exception) -> None:
        reason = f"judge backend error: {type(error).__name__}: {error}"
        for i in pending:
            results[i] = RewardResult.failure(self.name, reason)
        self._count("errors", len(pending))

    def _parse(self, output) -> RewardResult | None:
        if not isinstance(output, str):
            return None
        try:
            return self.result(output)
        except Exception:  # noqa: BLE001 - a parser surprise is an unparsable output
            return None

    def _unparsable(self, output) -> RewardResult:
        self._count("unparsable")
        details = self._raw(output if isinstance(output, str) else repr(output))
        return RewardResult(self.fallback_reward, self.name, reason=UNPARSABLE, failed=True, details=details)

    def _raw(self, output: str) -> dict[str, str]:
        if self.keep_output_chars <= 0:
            return {}
        return {"judge_output": output[-self.keep_output_chars:]}

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n


@register_source("rllm")
class RLLMJudge(LLMJudge):
    """Reference-guided judge: reward 1 for `Verdict: CORRECT`, 0 for `Verdict: INCORRECT`.
    details: verdict ("CORRECT"/"INCORRECT"), correct (bool), attempts, judge_output."""

    name = "rllm"
    required_fields = {"question", "reference", "response"}
    default_template = RLLM_TEMPLATE

    def fields(self, sample: RewardSample) -> dict[str, str]:
        if sample.reference is None or not str(sample.reference).strip():
            raise ValueError("sample has no reference answer")
        return dict(question=sample.prompt, reference=str(sample.reference),
                    response=self.response_text(sample))

    def result(self, output: str) -> RewardResult | None:
        verdict = parse_verdict(output)
        if verdict is None:
            return None
        return RewardResult(float(verdict), self.name,
                            details={"verdict": "CORRECT" if verdict else "INCORRECT", "correct": verdict})


@register_source("grm")
class GRMJudge(LLMJudge):
    """Multi-dimensional generative reward model: reward = (weighted mean score - 1) / 9.
    details: scores ({dimension: score}), mean (weighted, 1..10), attempts, judge_output.

    `dimensions`: see `build_dimensions`; `out_of_range`: "reject" or "clamp" (module docstring)."""

    name = "grm"
    required_fields = {"question", "response", "dimensions"}
    optional_fields = {"reference"}
    default_template = GRM_TEMPLATE
    min_score, max_score = 1.0, 10.0

    def __init__(self, backend=None, *, dimensions=None, out_of_range: str = "reject", **kwargs):
        if out_of_range not in ("reject", "clamp"):
            raise ConfigError(f"out_of_range must be 'reject' or 'clamp', got {out_of_range!r}")
        self.dimensions = build_dimensions(dimensions)
        self.out_of_range = out_of_range
        super().__init__(backend, **kwargs)

    def dimensions_text(self) -> str:
        return "\n".join(f"- {d.name}: {d.description}" if d.description else f"- {d.name}"
                         for d in self.dimensions)

    def fields(self, sample: RewardSample) -> dict[str, str]:
        reference = str(sample.reference) if sample.reference is not None else "(none)"
        return dict(question=sample.prompt, response=self.response_text(sample),
                    dimensions=self.dimensions_text(), reference=reference)

    def result(self, output: str) -> RewardResult | None:
        scores = parse_scores(output, [d.name for d in self.dimensions])
        if scores is None:
            return None
        scores = self._in_range(scores)
        if scores is None:
            return None
        total = sum(d.weight for d in self.dimensions)
        mean = sum(d.weight * scores[d.name] for d in self.dimensions) / total
        reward = (mean - self.min_score) / (self.max_score - self.min_score)
        return RewardResult(reward, self.name, details={"scores": scores, "mean": mean})

    def _in_range(self, scores: dict[str, float]) -> dict[str, float] | None:
        lo, hi = self.min_score, self.max_score
        if self.out_of_range == "clamp":
            return {k: min(max(v, lo), hi) for k, v in scores.items()}
        return scores if all(lo <= v <= hi for v in scores.values()) else None

