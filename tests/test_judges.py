"""LLM judges (rllm, grm) and the generation backends they call."""
from __future__ import annotations

import pytest
import torch

from megatron_ernie.rewards.generation import CallableBackend, HFGenerationBackend, build_backend
from megatron_ernie.rewards.judges import (
    GRMJudge,
    RLLMJudge,
    TemplateError,
    UNPARSABLE,
    parse_scores,
    parse_verdict,
    truncate_tail,
)
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.types import RewardSample

SAMPLE = RewardSample(prompt="What is 2 + 2?", response="<think>\n2 plus 2 makes 4\n</think>\n\nThe answer is 4.",
                      reference="4", domain="math", group="g0")
DIMS = ["helpfulness", "correctness", "instruction_following", "safety", "style"]


def rllm(outputs=("Verdict: CORRECT",), **kw) -> RLLMJudge:
    return RLLMJudge(CallableBackend.fixed(outputs), **kw)


def raising_backend(prompts):
    raise RuntimeError("server down")


# --- prompt construction ---------------------------------------------------------------------
def test_rllm_prompt_exact_with_think_stripped():
    judge = rllm(template="Q: {question}\nREF: {reference}\nA: {response}\nVerdict?")
    assert judge.build_prompt(SAMPLE) == "Q: What is 2 + 2?\nREF: 4\nA: The answer is 4.\nVerdict?"


def test_rllm_prompt_truncates_long_response_to_its_tail():
    judge = rllm(template="{question}|{reference}|{response}", max_response_chars=10)
    # "The answer is 4." has 16 characters: the first 6 go
    assert judge.build_prompt(SAMPLE) == \
        "What is 2 + 2?|4|[... 6 earlier characters truncated ...]\nswer is 4."


def test_default_rllm_prompt_holds_reference_and_final_answer_only():
    prompt = rllm().build_prompt(SAMPLE)
    assert "[Question]\nWhat is 2 + 2?\n\n[Reference answer]\n4\n\n[Response]\nThe answer is 4.\n\n" in prompt
    assert "<think>" not in prompt and "2 plus 2 makes" not in prompt
    assert prompt.endswith("Verdict: CORRECT\nor\nVerdict: INCORRECT")


def test_grm_prompt_lists_weighted_dimensions():
    judge = GRMJudge(CallableBackend.fixed([""]), dimensions={"accuracy": {"weight": 2, "description": "is it right"},
                                                            "tone": 1},
                     template="{dimensions}\n--\n{question}\n--\n{response}\n--\n{reference}")
    assert judge.build_prompt(SAMPLE) == "- accuracy: is it right\n- tone\n--\nWhat is 2 + 2?\n--\nThe answer is 4.\n--\n4"
    no_ref = RewardSample(prompt="Write a haiku", response="Leaves fall")
    assert judge.build_prompt(no_ref).endswith("--\n(none)")


def test_final_answer_and_truncation_helpers():
    from megatron_ernie.rewards.text import strip_think as final_answer

    assert final_answer("<think>a</think>b<think>c</think>  d ") == "d"
    assert final_answer("<think>never finished") == ""
    assert final_answer("plain") == "plain"
    assert truncate_tail("abcdef", 6) == "abcdef"
    assert truncate_tail("abcdef", 2) == "[... 4 earlier characters truncated ...]\nef"


@pytest.mark.parametrize("template, message", [
    ("{question} {reference}", "lacks required placeholder(s) {response}"),
    ("{question} {reference} {response} {answer}", "unknown placeholder(s) {answer}"),
    ("{question} {reference} {response} {}", "not a plain {name}"),
    ("{question} {reference} {response:>10}", "not a plain {name}"),
    ("{question} {reference} {response", "malformed"),
])
def test_bad_templates_fail_at_construction(template, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("(", r"\(").replace(")", r"\)")):
        rllm(template=template)


def test_literal_braces_and_optional_placeholders_are_fine():
    judge = GRMJudge(CallableBackend.fixed([""]), template='{question}{response}{dimensions} as {{"name": score}}')
    assert judge.build_prompt(SAMPLE).endswith('as {"name": score}')
    with pytest.raises(TemplateError, match="unknown"):
        rllm(template="{question}{reference}{response}{dimensions}")   # grm-only placeholder


# --- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("output, verdict", [
    ("Verdict: CORRECT", True),
    ("The final answer matches.\nVerdict: INCORRECT", False),
    ("**Verdict:** correct.", True),
    ("### Final verdict: __Incorrect__", False),
    ("Verdict: INCORRECT\nOn reflection...\nVerdict: CORRECT", True),             # the last one counts
    ("Verdict: CORRECT\n(This verdict follows the reference.)", True),             # label without a verdict
    ("<think>Verdict: INCORRECT</think>\nVerdict: CORRECT", True),                 # judge reasoning ignored
    ("CORRECT", True),                                                             # bare final word
    ("", None),
    ("\x00\x9f\xff\ufffd garbage ###", None),
    ("<think>Verdict: CORRECT", None),                                             # only unfinished thinking
    ("<think>the response looks fine</think>", None),
    ("Verdict: CORRECT or Verdict: INCORRECT", None),                              # contradictory
    ("Verdict: CORRECT, INCORRECT", None),
    ("Verdict: not correct", None),
    ("The response is correct.", None),                                            # free text is not a verdict
])
def test_parse_verdict(output, verdict):
    assert parse_verdict(output) is verdict


@pytest.mark.parametrize("output, scores", [
    ("helpfulness: 8\ncorrectness: 7\ninstruction_following: 9\nsafety: 10\nstyle: 6",
     dict(helpfulness=8, correctness=7, instruction_following=9, safety=10, style=6)),
    ("Good answer overall.\n1. **Helpfulness**: 7/10\n2. Correctness: 8.5\n- Instruction following: 4/5\n"
     "- `safety`: 10/10\n- Style = 3", dict(helpfulness=7, correctness=8.5, instruction_following=8, safety=10, style=3)),
    ('<think>helpfulness: 1</think>Scores:\n```json\n{"helpfulness": 9, "correctness": "7/10", '
     '"instruction_following": 8, "safety": 10, "style": 5}\n```',
     dict(helpfulness=9, correctness=7, instruction_following=8, safety=10, style=5)),
    ('{"scores": {"Helpfulness": 2, "Correctness": 3, "Instruction-Following": 4, "Safety": 5, "Style": 6}}',
     dict(helpfulness=2, correctness=3, instruction_following=4, safety=5, style=6)),
    ("helpfulness: 2\nhelpfulness: 9\ncorrectness: 9\ninstruction_following: 9\nsafety: 9\nstyle: 9",
     dict(helpfulness=9, correctness=9, instruction_following=9, safety=9, style=9)),    # last line wins
    ("helpfulness: 8\ncorrectness: 7", None),                                           # dimensions missing
    ('{"helpfulness": 8, "correctness": null, "instruction_following": 1, "safety": 1, "style": 1}', None),
    ("", None),
    ("<think>helpfulness: 8\ncorrectness: 7\ninstruction_following: 9\nsafety: 10\nstyle: 6", None),
])
def test_parse_scores(output, scores):
    got = parse_scores(output, DIMS)
    assert got == (None if scores is None else {k: float(v) for k, v in scores.items()})


def test_grm_reward_is_weighted_mean_mapped_to_unit_interval():
    judge = GRMJudge(CallableBackend.fixed(["a: 10\nb: 1"]), dimensions={"a": 3, "b": 1})
    [res] = judge.score([SAMPLE])
    # weighted mean (3*10 + 1*1) / 4 = 7.75 -> (7.75 - 1) / 9 = 0.75
    assert res.reward == pytest.approx(0.75) and not res.failed
    assert res.details["scores"] == {"a": 10.0, "b": 1.0} and res.details["mean"] == pytest.approx(7.75)


def test_grm_out_of_range_rejected_by_default_or_clamped():
    outputs = ["a: 11\nb: 5", "a: 0/10\nb: 10"]
    strict = GRMJudge(CallableBackend.fixed(outputs), dimensions=["a", "b"])
    assert [(r.failed, r.reason) for r in strict.score([SAMPLE, SAMPLE])] == [(True, UNPARSABLE)] * 2
    assert strict.stats["unparsable"] == 2
    clamped = GRMJudge(CallableBackend.fixed(outputs), dimensions=["a", "b"], out_of_range="clamp")
    # (10 + 5) / 2 = 7.5 -> 6.5 / 9; (1 + 10) / 2 = 5.5 -> 4.5 / 9
    assert [r.reward for r in clamped.score([SAMPLE, SAMPLE])] == pytest.approx([6.5 / 9, 0.5])


def test_grm_dimension_validation():
    with pytest.raises(ValueError, match="weight"):
        GRMJudge(CallableBackend.fixed([""]), dimensions={"a": -1})
    with pytest.raises(ValueError, match="repeat"):
        GRMJudge(CallableBackend.fixed([""]), dimensions=["style", "Style"])
    with pytest.raises(ValueError, match="sum to 0"):
        GRMJudge(CallableBackend.fixed([""]), dimensions={"a": 0})


# --- scoring, counting, failures -------------------------------------------------------------
def test_unparsable_output_gets_fallback_and_is_counted():
    judge = rllm(["Verdict: CORRECT", "no idea", "", "Verdict: INCORRECT"], fallback_reward=0.25)
    results = judge.score([SAMPLE] * 4)
    assert [r.reward for r in results] == [1.0, 0.25, 0.25, 0.0]
    assert [r.failed for r in results] == [False, True, True, False]
    assert results[1].reason == UNPARSABLE and results[1].details["judge_output"] == "no idea"
    assert results[0].details["verdict"] == "CORRECT" and results[0].details["correct"] is True
    assert results[3].details["verdict"] == "INCORRECT" and results[3].source == "rllm"
    assert judge.stats == {"scored": 2, "unparsable": 2, "errors": 0, "invalid": 0, "retried": 0}


def test_backend_exception_fails_the_batch_without_raising():
    judge = RLLMJudge(CallableBackend(raising_backend))
    results = judge.score([SAMPLE] * 3)
    assert all(r.failed and r.reward == 0.0 for r in results)
    assert results[0].reason == "judge backend error: RuntimeError: server down"
    assert judge.stats["errors"] == 3 and judge.stats["scored"] == 0


def test_backend_with_wrong_output_count_counts_as_error():
    judge = RLLMJudge(CallableBackend(lambda prompts: ["Verdict: CORRECT"]))
    results = judge.score([SAMPLE] * 2)
    assert all(r.failed for r in results) and "2 prompts" in results[0].reason
    assert judge.stats["errors"] == 2


def test_batch_is_one_generate_call_and_invalid_samples_are_not_sent():
    backend = CallableBackend.fixed(["Verdict: CORRECT"])
    judge = RLLMJudge(backend, max_new_tokens=64, temperature=0.0, seed=3)
    no_ref = RewardSample(prompt="q", response="r")
    results = judge.score([SAMPLE, no_ref, SAMPLE, SAMPLE])
    assert len(backend.calls) == 1
    call = backend.calls[0]
    assert len(call["prompts"]) == 3 and (call["max_new_tokens"], call["temperature"], call["seed"]) == (64, 0.0, 3)
    assert results[1].failed and "no reference answer" in results[1].reason
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 1.0]
    assert judge.stats == {"scored": 3, "unparsable": 0, "errors": 0, "invalid": 1, "retried": 0}
    assert judge.score([]) == [] and len(backend.calls) == 1


def test_retries_resend_only_unparsable_prompts_with_sampling():
    answers = iter([["Verdict: CORRECT", "garbage", "junk"], ["Verdict: INCORRECT", "still junk"], ["junk again"]])
    backend = CallableBackend(lambda prompts: next(answers))
    judge = RLLMJudge(backend, retries=2, retry_temperature=0.9, seed=10)
    results = judge.score([SAMPLE] * 3)
    assert [len(c["prompts"]) for c in backend.calls] == [3, 2, 1]
    assert [(c["temperature"], c["seed"]) for c in backend.calls] == [(0.0, 10), (0.9, 11), (0.9, 12)]
    assert [(r.reward, r.failed) for r in results] == [(1.0, False), (0.0, False), (0.0, True)]
    assert results[1].details["attempts"] == 2 and results[2].details["judge_output"] == "junk again"
    assert judge.stats == {"scored": 2, "unparsable": 1, "errors": 0, "invalid": 0, "retried": 3}


def test_failed_retry_round_keeps_first_outputs_as_unparsable():
    calls = []

    def backend(prompts):
        calls.append(prompts)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return ["garbage"] * len(prompts)

    judge = RLLMJudge(CallableBackend(backend), retries=1)
    [res] = judge.score([SAMPLE])
    assert res.reason == UNPARSABLE and judge.stats["unparsable"] == 1 and judge.stats["errors"] == 0


def test_registry_builds_judges_with_name_and_options():
    judge = build_source("answer_judge", "rllm", backend=CallableBackend.fixed(["Verdict: CORRECT"]), retries=1)
    assert isinstance(judge, RLLMJudge) and judge.name == "answer_judge"
    assert judge.score([SAMPLE])[0].source == "answer_judge"
    grm = build_source("quality", "grm", backend=CallableBackend.fixed(["x: 10"]), dimensions=["x"])
    assert grm.score([SAMPLE])[0].reward == 1.0
    with pytest.raises(ValueError, match="needs a `backend`"):
        build_source("j", "rllm")
    with pytest.raises(ValueError, match="backend.type='vllm'"):
        build_source("j", "rllm", backend={"type": "vllm"})
    with pytest.raises(TypeError, match="rewards.sources.j"):
        build_source("j", "grm", backend=CallableBackend.fixed([""]), no_such_option=1)


# --- a real (tiny, random) model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.helpers import TEST_DENSE, save_hf_model

    # one intra-op thread: a tiny model gains nothing from more, and on a busy 2-core machine
    # contended threads make generation ~50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield save_hf_model(TEST_DENSE, tmp_path_factory.mktemp("judge") / "hf", seed=11)
    torch.set_num_threads(threads)


def test_hf_backend_left_padding_matches_single_prompts_and_keeps_global_rng(tiny_model_dir):
    backend = build_backend({"type": "hf", "path": str(tiny_model_dir), "tokenizer": "demo"})
    assert isinstance(backend, HFGenerationBackend)
    prompts = ["What is the capital of France? Answer in one word.", "Hi"]
    batched = backend.generate(prompts, max_new_tokens=6)
    assert batched == [backend.generate([p], max_new_tokens=6)[0] for p in prompts]
    state = torch.get_rng_state()
    sampled = backend.generate(prompts, max_new_tokens=6, temperature=1.0, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert sampled == backend.generate(prompts, max_new_tokens=6, temperature=1.0, seed=5)


def test_hf_backend_needs_a_tokenizer(tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        build_backend({"type": "hf", "path": str(tiny_model_dir)})


def test_end_to_end_tiny_random_ernie_judge_is_unparsable_and_deterministic(tiny_model_dir):
    judge = build_source("judge", "rllm", max_new_tokens=8,
                         backend={"type": "hf", "path": str(tiny_model_dir), "tokenizer": "demo"})
    other = RewardSample(prompt="Name a prime.", response="7", reference="2")
    first = judge.score([SAMPLE, other])
    second = judge.score([SAMPLE, other])
    assert all(r.failed and r.reason == UNPARSABLE and r.reward == 0.0 for r in first + second)
    assert judge.stats == {"scored": 0, "unparsable": 4, "errors": 0, "invalid": 0, "retried": 0}
    outputs = [r.details["judge_output"] for r in first]
    assert outputs == [r.details["judge_output"] for r in second]       # greedy: same output twice
    assert any(outputs)
