"""The reward command lines: scoring a JSONL with a router config, and the prompt pre-filter with a
real (tiny) model sampling responses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _run(module_fn: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys\nfrom megatron_ernie.rewards.cli import {module_fn}\nsys.exit({module_fn}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


RULES = {"sources": {"math": {"type": "math"}, "check": {"type": "checklist"}},
         "routes": [{"domain": "math", "combine": {"math": 1.0}}, {"combine": {"check": 1.0}}]}


def test_score_writes_one_reward_record_per_sample(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RULES))
    _jsonl(tmp_path / "s.jsonl", [
        {"prompt": "1/2 as a decimal?", "response": r"\boxed{0.5}", "domain": "math", "reference": "1/2", "id": 7},
        {"prompt": "Say hi", "response": "hi there", "checklist": [{"type": "max_words", "value": 1}]},
        {"prompt": "?", "response": "x", "domain": "math"}])
    out = _run("score_main", "--rewards", "r.yaml", "--samples", "s.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["reward"]["reward"] for r in rows] == [1.0, 0.0, 0.0]
    assert rows[0]["id"] == 7 and rows[2]["reward"]["failed"] == ["math"]
    assert json.loads(out.stdout.splitlines()[-1])["reward/math/failed"] == 1.0


def test_bad_input_names_file_and_line_and_leaves_the_output(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RULES))
    (tmp_path / "o.jsonl").write_text("earlier\n")
    _jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}, "{oops"])
    out = _run("score_main", "--rewards", "r.yaml", "--samples", "s.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "s.jsonl:2: malformed JSON" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"sources": {"m": {"type": "maths"}}, "routes": [{"combine": {"m": 1}}]}))
    _jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}])
    out = _run("score_main", "--rewards", "bad.yaml", "--samples", "s.jsonl", "--out", "o.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "bad.yaml: rewards.sources.m.type='maths': unknown" in out.stderr
    assert (tmp_path / "o.jsonl").read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "o.jsonl", "r.yaml", "s.jsonl"]  # no temp files


def test_prefilter_drops_prompts_always_or_never_solved_by_the_sampled_model(tmp_path):
    from tests.helpers import TEST_DENSE, save_hf_model

    save_hf_model(TEST_DENSE, tmp_path / "policy", seed=0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"sources": {"re": {"type": "regex", "mode": "search"}},
                                                     "routes": [{"combine": {"re": 1.0}}]}))
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "easy", "reference": ".*"}, {"prompt": "hard", "reference": "^IMPOSSIBLE$"},
                                  {"prompt": "easy too", "reference": "^"}])
    out = _run("prefilter_main", "--rewards", "r.yaml", "--prompts", "p.jsonl", "--model", "policy", "--tokenizer",
               "demo", "--k", "3", "--max-new-tokens", "8", "--out", "kept.jsonl", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.splitlines()[-1])
    assert (counts["total"], counts["too_easy"], counts["too_hard"], counts["kept"]) == (3, 2, 1, 0)
    assert counts["reward/re/scored"] == 9  # 3 prompts x 3 sampled responses, one scoring pass
    assert (tmp_path / "kept.jsonl").read_text() == ""
    summary = json.loads((tmp_path / "kept.jsonl.summary.json").read_text())
    assert summary["pass_rate_histogram"] == {"0/3": 1, "1/3": 0, "2/3": 0, "3/3": 2}
    assert (tmp_path / "kept.jsonl.pass_rates.png").stat().st_size > 0
