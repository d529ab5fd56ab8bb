"""Offline UPO pairs: sample N responses per prompt with any rollout engine, score them with the
reward system (raw scores, no running normalisation), keep each prompt's (best, worst) when their
margin exceeds a threshold, and write pair JSONL for `recipe=upo_offline` / `rl.ppo.offline_pairs`.

    python tools/build_pairs.py --model runs/chain/00_sft --prompts bundled:rl_math_train.jsonl \
        --rewards recipes/rewards/demo.yaml --samples 8 --out pairs.jsonl

Resumable and atomic: each finished batch of prompts is appended (and fsynced) to
`<out>.partial`, one line per prompt (its pair or none); a rerun after a crash or kill continues
after the last complete line. The pair file appears only at the end, by rename, in prompt order,
and the partial file is then removed. A finished `<out>` is left alone (rerunning is a no-op).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from megatron_ernie.errors import DataError
from megatron_ernie.rl.engine import SamplingParams
from megatron_ernie.rl.rollout import Prompt, completion_seed


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _done(partial: Path) -> dict[int, dict | None]:
    """Prompts already processed: {index: pair or None}; a torn last line (killed mid-write) is ignored."""
    done: dict[int, dict | None] = {}
    if not partial.exists():
        return done
    lines = partial.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 1:  # the last line only: a write cut short
                break
            raise DataError(f"{partial}:{n}: corrupt progress line (delete the file to start over)") from None
        done[int(row["index"])] = row["pair"]
    return done


def pick_pair(responses: Sequence, rewards: Sequence[float], margin: float) -> tuple[int, int] | None:
    """(best, worst) indices of a prompt's responses when best − worst > margin (ties: the first
    sampled); else None. Online UPO (algorithms/ppo.py) picks its pairs the same way."""
    if len(responses) < 2:
        return None
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return (best, worst) if rewards[best] - rewards[worst] > margin else None


def _pair_record(p: Prompt, index: int, responses, rewards, chosen: int, rejected: int) -> dict:
    prompt = {"prompt": p.text} if len(p.messages) == 1 else {"messages": p.messages}
    out = {**prompt, "chosen": responses[chosen], "rejected": responses[rejected], "domain": p.domain,
           "chosen_reward": rewards[chosen], "rejected_reward": rewards[rejected],
           "margin": rewards[chosen] - rewards[rejected], "prompt_index": index}
    if p.reference is not None:
        out["reference"] = p.reference
    return out


def build_pairs(engine, prompts: Sequence[Prompt], router, render: Callable, decode: Callable, out: str | Path, *,
                samples: int = 8, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, margin: float = 0.0, seed: int = 0, batch_size: int = 8,
                progress: bool = True) -> dict[str, float]:
    """Writes `out`; returns counts (prompts, pairs, no_pair, resumed, mean margin)."""
    from tqdm import tqdm

    from megatron_ernie.rewards.types import RewardSample
    from megatron_ernie.rl.evaluate import check_routes, raw_router
    from megatron_ernie.runtime.atomic import atomic_file

    if samples < 2:
        raise DataError(f"samples={samples}: a pair needs at least 2 responses per prompt")
    out = Path(out)
    if out.exists() and not partial_path(out).exists():
        pairs = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
        return {"prompts": len(prompts), "pairs": pairs, "no_pair": len(prompts) - pairs, "resumed": len(prompts),
                "margin_mean": float("nan")}
    router = raw_router(router)
    check_routes(prompts, router)
    partial = partial_path(out)
    done = _done(partial)
    resumed = len(done)
    todo = [i for i in range(len(prompts)) if i not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts), initial=resumed, desc="pairs", unit="prompt", disable=not progress)
    with partial.open("a", encoding="utf-8") as log:
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            requests, params = [], []
            for i in chunk:
                ids = render(prompts[i].messages)
                for s in range(samples):
                    requests.append(ids)
                    params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                                 top_k=top_k, seed=completion_seed(seed, i, s)))
            texts = [decode(c.token_ids) for c in engine.generate(requests, params)]
            scored = router.score([RewardSample(prompt=prompts[i].text, response=texts[j * samples + s],
                                                domain=prompts[i].domain, task=prompts[i].task,
                                                reference=prompts[i].reference, tests=prompts[i].tests,
                                                checklist=prompts[i].checklist, group=str(i), uid=f"{i}/{s}")
                                   for j, i in enumerate(chunk) for s in range(samples)])
            for j, i in enumerate(chunk):
                responses = texts[j * samples:(j + 1) * samples]
                rewards = [float(r.reward) for r in scored[j * samples:(j + 1) * samples]]
                picked = pick_pair(responses, rewards, margin)
                done[i] = _pair_record(prompts[i], i, responses, rewards, *picked) if picked else None
                log.write(json.dumps({"index": i, "pair": done[i]}, ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
            bar.update(len(chunk))
    bar.close()
    pairs = [done[i] for i in range(len(prompts)) if done.get(i)]
    with atomic_file(out) as f:
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    partial.unlink()
    margins = [p["margin"] for p in pairs]
    return {"prompts": len(prompts), "pairs": len(pairs), "no_pair": len(prompts) - len(pairs), "resumed": resumed,
            "margin_mean": sum(margins) / len(margins) if margins else 0.0}


def main(argv=None) -> int:
    import argparse

    from megatron_ernie.rl import cli
    from megatron_ernie.rl.rollout import load_prompts

    p = argparse.ArgumentParser(prog="build_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, Megatron checkpoint or training run directory")
    p.add_argument("--prompts", required=True, help="prompt JSONL file(s), comma separated")
    p.add_argument("--rewards", default=None, help="reward router YAML (default: the run's rl.rewards)")
    p.add_argument("--out", required=True, type=Path, help="pair JSONL to write")
    p.add_argument("--samples", type=int, default=8, help="responses per prompt")
    p.add_argument("--margin", type=float, default=0.0, help="keep a pair when best − worst reward > this")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("megatron", "hf", "vllm"), default="megatron")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--no-thinking", dest="thinking", action="store_false", default=None,
                   help="prompts end with an empty think block (default: the run's rl.rollout.thinking)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)

    def body() -> int:
        prompts = load_prompts([x.strip() for x in a.prompts.split(",")])
        m = cli.open_model(a.model, tokenizer=a.tokenizer, thinking=a.thinking, prompts=prompts, rewards=a.rewards)
        stats = build_pairs(m.engine(a.engine, a.seed), prompts, m.router, *m.chat(), a.out, samples=a.samples,
                            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            margin=a.margin, seed=a.seed, batch_size=a.batch_size, progress=a.progress)
        print(json.dumps({"out": str(a.out), **stats}))
        return 0

    return cli.guarded(body)
