"""Checklist rewards: every criterion type passing and failing, the weighted fraction, malformed
criteria as failed results naming index and key, and <think> stripping."""
import pytest

from megatron_ernie.rewards import checklist as cl
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.types import RewardSample

ESSAY = "# Title\n\nFirst paragraph here. It has two sentences!\n\n## Part\n\nSecond paragraph? Yes."
LIST = "Intro:\n- apples\n- pears\n* plums\n1. one\n2) two\n  - nested\n---\n*not a bullet*"

# (criterion, text, ok)
CASES = [
    ({"type": "min_words", "value": 5}, "one two three four five", True),
    ({"type": "min_words", "value": 6}, "one two three four five", False),
    ({"type": "min_words", "value": 6}, "我爱北京天安门", True),               # one word per Han character
    ({"type": "max_words", "value": 3}, "don't well-known words", True),     # inner ' and - keep a word whole
    ({"type": "max_words", "value": 2}, "don't well-known words", False),
    ({"type": "min_chars", "value": 5}, "  abcde  ", True),                  # surrounding space not counted
    ({"type": "min_chars", "value": 6}, "  abcde  ", False),
    ({"type": "max_chars", "value": 5}, "abcde", True),
    ({"type": "max_chars", "value": 4}, "abcde", False),
    ({"type": "min_sentences", "value": 4}, ESSAY, True),
    ({"type": "min_sentences", "value": 2}, "Just one sentence, 3.5 long!", False),
    ({"type": "max_sentences", "value": 3}, ESSAY, False),
    ({"type": "max_sentences", "value": 2}, "Pi is 3.14 roughly. 真的。", True),  # "3.14" is not a sentence end
    ({"type": "num_paragraphs", "value": 4}, ESSAY, True),                    # headings are blocks too
    ({"type": "num_paragraphs", "min": 5}, ESSAY, False),
    ({"type": "required_words", "words": ["ernie", "MoE"]}, "ERNIE is a MoE model", True),
    ({"type": "required_words", "words": ["ernie", "MoE"], "case_sensitive": True}, "ERNIE is a MoE model", False),
    ({"type": "required_words", "words": ["cat"]}, "concatenate", False),                  # whole words
    ({"type": "required_words", "words": ["cat", "dog"], "mode": "any"}, "a dog", True),
    ({"type": "required_words", "words": ["cat", "dog"], "mode": "all"}, "a dog", False),
    ({"type": "required_words", "words": ["北京"]}, "我爱北京天安门", True),                # CJK: no \b needed
    ({"type": "forbidden_words", "words": ["very", "really"]}, "It is quite good.", True),
    ({"type": "forbidden_words", "words": ["very"]}, "It is Very good.", False),
    ({"type": "json_valid"}, '{"a": 1}', True),
    ({"type": "json_valid"}, "{'a': 1}", False),
    ({"type": "json_valid", "required_keys": ["a", "b"]}, '```json\n{"a": 1, "b": [2]}\n```', True),
    ({"type": "json_valid", "required_keys": ["b"]}, '{"a": 1}', False),
    ({"type": "json_valid", "required_keys": ["a"]}, "[1, 2]", False),
    ({"type": "json_valid", "allow_code_fence": False}, '```json\n{"a": 1}\n```', False),
    ({"type": "markdown_headings", "value": 2}, ESSAY, True),
    ({"type": "markdown_headings", "value": 3}, ESSAY, False),
    ({"type": "markdown_headings", "value": 1}, "#hashtag is not a heading", False),
    ({"type": "num_items", "value": 6}, LIST, True),                          # 3 bullets + 2 numbered + nested
    ({"type": "num_items", "value": 4, "style": "bullet"}, LIST, True),
    ({"type": "num_items", "value": 5}, LIST, False),
    ({"type": "markdown_list_items", "exact": 2, "style": "numbered"}, LIST, True),
    ({"type": "markdown_list_items", "min": 7}, LIST, False),
    ({"type": "markdown_list_items", "max": 5}, LIST, False),
    ({"type": "language", "value": "en"}, "This is plainly English text.", True),
    ({"type": "language", "value": "en"}, "这是中文，不是英文。", False),
    ({"type": "language", "value": "zh"}, "我用Python写了一个程序。", True),   # one Latin word among Han chars
    ({"type": "language", "value": "zh", "min_ratio": 0.95}, "我用Python写了一个程序。", False),
    ({"type": "language", "value": "ru"}, "Привет, мир", True),
    ({"type": "language", "value": "ja"}, "日本語の文章です", True),
    ({"type": "language", "value": "ja"}, "中文文本", False),                  # Han only: no kana
    ({"type": "language", "value": "Cyrillic"}, "Hello", False),
    ({"type": "language", "value": "en"}, "12345 !!!", False),                 # no letters at all
    ({"type": "case", "value": "lower"}, "all lower, 123.", True),
    ({"type": "case", "value": "lower"}, "not All lower", False),
    ({"type": "case", "value": "upper"}, "SHOUTING 123!", True),
    ({"type": "case", "value": "upper"}, "SHOUTiNG", False),
    ({"type": "case", "value": "upper"}, "中文", False),                       # nothing to be upper
    ({"type": "case", "value": "title"}, "The Quick Brown Fox", True),
    ({"type": "case", "value": "title"}, "The Lord of the Rings", False),
    ({"type": "case", "value": "title", "allow_minor_words": True}, "The Lord of the Rings", True),
    ({"type": "starts_with", "value": "Dear"}, "  Dear Sir,", True),
    ({"type": "starts_with", "value": "dear"}, "Dear Sir,", False),
    ({"type": "starts_with", "value": "dear", "case_sensitive": False}, "Dear Sir,", True),
    ({"type": "ends_with", "value": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?\n", True),
    ({"type": "ends_with", "value": "Bye."}, "Bye. See you", False),
    ({"type": "contains_regex", "value": r"\d{4}-\d{2}-\d{2}"}, "on 2024-05-01", True),
    ({"type": "contains_regex", "value": r"\d{4}-\d{2}-\d{2}"}, "on May 1st", False),
    ({"type": "contains_regex", "value": "ab", "min_count": 2, "ignore_case": True}, "AB ab", True),
    ({"type": "contains_regex", "value": "ab", "max_count": 1, "min_count": 0}, "ab ab", False),
    ({"type": "no_commas"}, "No commas here.", True),
    ({"type": "no_commas"}, "One, two", False),
    ({"type": "no_commas"}, "一，二", False),                                   # full-width comma
    ({"type": "placeholder_count", "value": 2}, "Dear [name], at [address].", True),
    ({"type": "placeholder_count", "value": 2}, "See [docs](http://x) and [name].", False),  # a link is not one
    ({"type": "quoted"}, '  "All of it quoted."  ', True),
    ({"type": "quoted"}, "“Curly quotes.”", True),
    ({"type": "quoted"}, '"Half quoted.', False),
    ({"type": "sections", "value": 2}, "SECTION 1\nintro\nSECTION 2\nbody", True),
    ({"type": "sections", "value": 2, "marker": "Part", "ignore_case": False}, "Part 1 x PART 2 y", False),
    ({"type": "sections", "min": 1, "marker": "Part"}, "part 1 x PART 2 y", True),
]


@pytest.mark.parametrize("crit,text,ok", CASES, ids=[f"{i}:{c[0]['type']}" for i, c in enumerate(CASES)])
def test_criterion(crit, text, ok):
    score, results = cl.evaluate(text, [crit])
    assert results[0]["ok"] is ok, results[0]["why"]
    assert score == (1.0 if ok else 0.0)
    assert results[0]["why"]


def test_every_registered_type_is_covered():
    covered = {c["type"] for c, _, ok in CASES if ok} & {c["type"] for c, _, ok in CASES if not ok}
    assert covered == set(cl.criterion_types())


def test_fraction_and_weights_by_hand():
    text = "hello world, this is short"
    checklist = [
        {"type": "min_words", "value": 3},                       # ok,   weight 1
        {"type": "no_commas", "weight": 2},                      # fails, weight 2
        {"type": "case", "value": "lower", "weight": 0.5},       # ok,   weight 0.5
        {"type": "max_words", "value": 2, "weight": 1.5},        # fails, weight 1.5
    ]
    score, results = cl.evaluate(text, checklist)
    assert score == pytest.approx((1 + 0.5) / (1 + 2 + 0.5 + 1.5))
    assert [r["ok"] for r in results] == [True, False, True, False]
    assert [r["weight"] for r in results] == [1.0, 2.0, 0.5, 1.5]
    unweighted = [{k: v for k, v in c.items() if k != "weight"} for c in checklist]
    assert cl.evaluate(text, unweighted)[0] == 0.5
    # a weight-0 criterion is reported but does not count
    score, results = cl.evaluate(text, [{"type": "no_commas", "weight": 0}, {"type": "min_words", "value": 1}])
    assert score == 1.0 and results[0]["ok"] is False


@pytest.mark.parametrize("checklist,index,key", [
    ([{"type": "min_words", "value": 1}, {"type": "word_salad"}], 1, "type"),
    ([{"value": 3}], 0, "type"),
    (["min_words"], 0, "type"),
    ([{"type": "min_words"}], 0, "value"),
    ([{"type": "min_words", "value": "ten"}], 0, "value"),
    ([{"type": "min_words", "value": True}], 0, "value"),
    ([{"type": "min_words", "value": -1}], 0, "value"),
    ([{"type": "num_items", "min": 5, "max": 2}], 0, "min"),
    ([{"type": "no_commas"}, {"type": "min_words", "value": 1, "weight": "high"}], 1, "weight"),
    ([{"type": "required_words", "words": "cat"}], 0, "words"),
    ([{"type": "required_words", "words": ["cat"], "mode": "some"}], 0, "mode"),
    ([{"type": "required_words", "word": ["cat"]}], 0, "word"),            # misspelt option
    ([{"type": "contains_regex", "value": "(unclosed"}], 0, "value"),
    ([{"type": "language", "value": "klingon"}], 0, "value"),
    ([{"type": "case", "value": "sentence"}], 0, "value"),
    ([{"type": "no_commas", "weight": 0}], -1, "weight"),
    ([], -1, "checklist"),
    (None, -1, "checklist"),
])
def test_malformed_criteria_are_failed_results(checklist, index, key):
    src = build_source("c", "checklist")
    (res,) = src.score([RewardSample(prompt="p", response="some text here", checklist=checklist)])
    assert res.failed and res.reward == 0.0
    assert (res.details["index"], res.details["key"]) == (index, key)
    assert f"checklist[{index}].{key}" in res.reason


def test_batch_survives_a_malformed_checklist():
    src = build_source("c", "checklist")
    good = RewardSample(prompt="p", response="a b c", checklist=[{"type": "min_words", "value": 3}])
    bad = RewardSample(prompt="p", response="a b c", checklist=[{"type": "nope"}])
    res = src.score([good, bad, good])
    assert [(r.reward, r.failed) for r in res] == [(1.0, False), (0.0, True), (1.0, False)]
    assert res[0].details["criteria"] == [
        {"index": 0, "type": "min_words", "ok": True, "why": "3 words, want >= 3", "weight": 1.0}]
    assert (res[0].details["satisfied"], res[0].details["total"]) == (1, 1)


def test_think_block_is_stripped_unless_disabled():
    response = "<think>Let me plan, carefully, with commas</think>\nfinal answer without them"
    crits = [{"type": "no_commas"}, {"type": "starts_with", "value": "final"}]
    sample = RewardSample(prompt="p", response=response, checklist=crits)
    (res,) = build_source("c", "checklist").score([sample])
    assert res.reward == 1.0 and res.details["think_stripped"] is True
    (raw,) = build_source("c", "checklist", strip_think=False).score([sample])
    assert raw.reward == 0.0 and raw.details["think_stripped"] is False
    # a response that never closed its <think> has no answer to check
    (open_,) = build_source("c", "checklist").score(
        [RewardSample(prompt="p", response="<think>still going", checklist=[{"type": "min_chars", "value": 1}])])
    assert open_.reward == 0.0 and not open_.failed


def test_counters():
    assert cl.count_words("Hello, world! It's well-known.") == 4
    assert cl.count_words("ERNIE 模型") == 3
    assert cl.count_sentences("One. Two! Three? Four") == 4
    assert cl.count_sentences("") == 0
    assert len(cl.paragraphs("a\n\n  \n\nb\nc\n\n")) == 2
