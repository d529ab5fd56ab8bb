"""The bundled RL demo data, generated deterministically by this module.

    python -m megatron_ernie.data.rl_data     # rewrites megatron_ernie/data/bundled/rl_*.jsonl

Four verifiable domains, each a prompt JSONL for RL (train and held-out splits, disjoint by
prompt text) and SFT records that teach the task's *format*:

- logic   — ordering chains of 3–4 people ("A is older than B. B is older than C." → who is the
            oldest / youngest), scored by
            the exact verifier on the committed answer;
- math    — two-step arithmetic answered in `\\boxed{}`, scored by the maths verifier;
- code    — a one-line function `f(x)` run against assertion tests in the code sandbox;
- general — a short sentence under a checklist (the ending asked for, at most 8 words).

The SFT split is a deliberately imperfect teacher, as real SFT data is: half the logic answers
name the person one step short of the chain's end, half the maths answers stop after the first
step, half the code uses a wrong operator and half the sentences miss the checklist's ending. An SFT model thus knows
each task's shape but not reliably the behaviour the verifier rewards; the RL stages
(`recipe=chain`) have to learn it from rewards, which is what the held-out accuracy measures.
`rl_pairs.jsonl`: fixed offline UPO pairs (verified answer over a typical mistake) on train prompts.
"""
from __future__ import annotations

import random
from pathlib import Path

from megatron_ernie.data.demo_data import write_jsonl

BUNDLED = Path(__file__).parent / "bundled"
DOMAINS = ("logic", "math", "code", "general")
_NAMES = ["A", "B", "C", "D"]  # one token each: the puzzle is the ordering, not copying a name
_RELATIONS = [("older", "oldest", "youngest"), ("taller", "tallest", "shortest"), ("faster", "fastest", "slowest")]
# the demo tokenizer's own words (it is trained on the SFT demo data): whole tokens a tiny model copies
_WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "milk", "rain", "home",
          "lamp", "door", "cake", "ship", "frog", "bell", "road", "hand", "apple", "water", "green",
          "house", "river", "light", "chair", "table", "music", "plant"]
_ENDINGS = [("an exclamation mark", "!"), ("a question mark", "?"), ("a full stop", ".")]
_OPS = {"plus": "+", "minus": "-", "times": "*"}


def rl_path(domain: str, split: str) -> Path:
    """The bundled prompt file of a domain's split ("train" or "eval")."""
    return BUNDLED / f"rl_{domain}_{split}.jsonl"


SFT_PATH = BUNDLED / "rl_sft.jsonl"


def _row(prompt: str, domain: str, task: str, **score) -> dict:
    return {"prompt": prompt, "domain": domain, "task": task, **score}


# --- the task families: (RL row, correct answer, plausible wrong answers) -------------------------
def _logic(rng: random.Random) -> tuple[dict, str, list[str]]:
    people = rng.sample(_NAMES, rng.choice([3, 4]))  # people[0] > people[1] > ...
    rel, top, bottom = rng.choice(_RELATIONS)
    facts = [f"{a} is {rel} than {b}." for a, b in zip(people, people[1:])]
    ask_top = rng.random() < 0.5
    answer = people[0] if ask_top else people[-1]
    prompt = f"{' '.join(facts)} Who is the {top if ask_top else bottom}?"
    say = lambda name: f"The answer is {name}."  # noqa: E731
    neighbour = people[1] if ask_top else people[-2]  # the typical slip: one step short of the end
    return _row(prompt, "logic", "ordering", reference=answer), say(answer), [say(neighbour)]


def _math(rng: random.Random) -> tuple[dict, str, list[str]]:
    a, b = rng.randint(2, 19), rng.randint(2, 19)
    c = rng.randint(1, a + b - 1)
    s, r = a + b, a + b - c
    prompt = f"Compute {a} + {b} - {c}. Put the answer in \\boxed{{}}."
    full = f"{a} + {b} = {s}. {s} - {c} = {r}. The answer is \\boxed{{{r}}}."
    early = f"{a} + {b} = {s}. The answer is \\boxed{{{s}}}."  # stops after the first step
    return _row(prompt, "math", "arithmetic", reference=str(r)), full, [early]


def _code(rng: random.Random) -> tuple[dict, str, list[str]]:
    word = rng.choice(list(_OPS))
    k, name, arg = rng.randint(2, 4), rng.choice("fghpq"), rng.choice("xyn")
    op = _OPS[word]
    fn = {"+": lambda x: x + k, "-": lambda x: x - k, "*": lambda x: x * k}[op]
    xs = rng.sample(range(1, 12), 3)
    tests = [{"code": f"assert {name}({x}) == {fn(x)}"} for x in xs]
    prompt = f"Write a Python function {name}({arg}) that returns {arg} {word} {k}."
    code = lambda o: f"def {name}({arg}):\n    return {arg} {o} {k}"  # noqa: E731
    return (_row(prompt, "code", "function", tests=tests), code(op),
            [code(o) for o in _OPS.values() if o != op])


def _general(rng: random.Random) -> tuple[dict, str, list[str]]:
    word, (ending, mark) = rng.choice(_WORDS), rng.choice(_ENDINGS)
    about = rng.choice([f"a short sentence about a {word}", f"one sentence with the word {word}",
                        f"a sentence that uses the word {word}"])
    prompt = f"Write {about}. End it with {ending}."
    checklist = [{"type": "ends_with", "value": mark}, {"type": "max_words", "value": 8}]
    body = rng.choice([f"I like the {word}", f"The {word} is nice", f"Is that a {word}", f"I saw a {word}"])
    return (_row(prompt, "general", "checklist", checklist=checklist), body + mark,
            [body + m for _, m in _ENDINGS if m != mark])


SIZES = {"code": 0.5}
FAMILIES = {"logic": _logic, "math": _math, "code": _code, "general": _general}


def _split(domain: str, seed: int, n_train: int, n_eval: int) -> tuple[list[tuple], list[tuple]]:
    """Distinct prompts, the held-out ones never seen in train (nor in the SFT records)."""
    rng, seen, items = random.Random(seed), set(), []
    for _ in range(100 * (n_train + n_eval)):
        if len(items) == n_train + n_eval:
            break
        item = FAMILIES[domain](rng)
        if item[0]["prompt"] not in seen:
            seen.add(item[0]["prompt"])
            items.append(item)
    else:
        raise ValueError(f"{domain}: fewer than {n_train + n_eval} distinct prompts")
    return items[:n_train], items[n_train:]


PAIRS_PATH = BUNDLED / "rl_pairs.jsonl"


def _pair(item: tuple, rng: random.Random, domain: str) -> dict:
    """A fixed offline UPO pair: the verified answer over one of the task's typical mistakes."""
    row, right, wrong = item
    score = {k: row[k] for k in ("reference",) if k in row}
    return {"prompt": row["prompt"], "chosen": right, "rejected": rng.choice(wrong), "domain": domain, **score}


def _sft_record(item: tuple, rng: random.Random, domain: str) -> dict:
    row, right, wrong = item
    # the imperfect teacher: right half the time, else one of the task's typical mistakes
    answer = right if rng.random() < 0.5 else rng.choice(wrong)
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}],
            "domain": domain}


def generate(seed: int = 0, n_train: int = 200, n_eval: int = 50, n_sft: int = 200,
             n_pairs: int = 100) -> dict[str, list[dict]]:
    """{file name: records}: per domain a train and an eval split; the SFT records and the fixed
    offline pairs, both drawn from the train prompts only."""
    out, sft, pairs = {}, [], []
    rng = random.Random(seed)
    for i, domain in enumerate(DOMAINS):
        scale = SIZES.get(domain, 1.0)  # code has fewer distinct prompts
        train, held_out = _split(domain, seed + 1 + i, int(n_train * scale), int(n_eval * scale))
        out[rl_path(domain, "train").name] = [row for row, _, _ in train]
        out[rl_path(domain, "eval").name] = [row for row, _, _ in held_out]
        sft += [_sft_record(item, rng, domain) for item in train[:n_sft]]
        pairs += [_pair(item, rng, domain) for item in train[:n_pairs]]
    rng.shuffle(sft)
    rng.shuffle(pairs)
    out[SFT_PATH.name], out[PAIRS_PATH.name] = sft, pairs
    return out


def write_bundled(directory: Path = BUNDLED) -> list[Path]:
    return [write_jsonl(records, directory / name) for name, records in generate().items()]


if __name__ == "__main__":
    for p in write_bundled():
        print(p)
