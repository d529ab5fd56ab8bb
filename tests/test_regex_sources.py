"""Regex sources run untrusted patterns (a sample's reference, a checklist from data) over model
output under a timeout: catastrophic backtracking fails one sample with the reason and the
batch goes on, in about the configured time."""
import time

import pytest

from megatron_ernie.rewards import checklist
from megatron_ernie.rewards import verifiers  # noqa: F401 - registers regex
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.types import RewardSample

EVIL = r"(a|aa)+$"           # exponential on "aaaa…b"
VICTIM = "a" * 64 + "b"


def _sample(response, reference=None, **kw):
    return RewardSample(prompt="q", response=response, reference=reference, **kw)


def test_regex_source_times_out_one_sample_and_scores_the_rest():
    src = build_source("r", "regex", timeout_s=0.3)
    t0 = time.monotonic()
    slow, fine, plain = src.score([_sample(VICTIM, EVIL), _sample("id AB-12", r"[A-Z]{2}-\d+"), _sample("abc", "b")])
    assert time.monotonic() - t0 < 2.0
    assert (slow.reward, slow.failed) == (0.0, True) and "timed out after 0.3s" in slow.reason
    assert slow.details["pattern"] == EVIL
    assert (fine.reward, plain.reward) == (1.0, 1.0)


def test_configured_pattern_over_a_pathological_response_times_out_too():
    src = build_source("r", "regex", pattern=EVIL, mode="fullmatch", timeout_s=0.2)
    [res] = src.score([_sample(VICTIM)])
    assert res.failed and "timed out" in res.reason
    [ok] = src.score([_sample("aaaa")])
    assert ok.reward == 1.0


def test_regex_timeout_option_is_checked():
    with pytest.raises(ValueError, match="timeout_s"):
        build_source("r", "regex", timeout_s=0)


def test_checklist_contains_regex_times_out_as_an_unmet_criterion(monkeypatch):
    monkeypatch.setattr(checklist, "REGEX_TIMEOUT_S", 0.2)
    src = build_source("c", "checklist")
    crits = [{"type": "contains_regex", "value": EVIL}, {"type": "min_words", "value": 1}]
    t0 = time.monotonic()
    [res] = src.score([_sample(VICTIM, checklist=crits)])
    assert time.monotonic() - t0 < 2.0
    first, second = res.details["criteria"]
    assert first["ok"] is False and "timed out after 0.2s" in first["why"], first
    assert second["ok"] is True and res.reward == 0.5
