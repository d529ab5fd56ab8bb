"""The bundled demo data, generated (deterministically) by this module.

    python -m megatron_ernie.data.demo_data      # rewrites megatron_ernie/data/bundled/{sft_demo,
                                                 #   preference_demo, preference_demo_eval}.jsonl

Short, regular patterns a 4-layer, 64-wide model learns in a couple of CPU minutes: arithmetic,
comparisons and spelling with and without thinking, chit-chat, multi-turn, role-play personas and
records with several responses.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

from megatron_ernie.data.sft import BUNDLED_SFT



_WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "milk", "rain", "home",
          "lamp", "door", "cake", "ship", "frog", "bell", "road", "hand", "apple", "water", "green",
          "house", "river", "light", "chair", "table", "music", "plant"]
_CHAT = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! How can I help you today?"),
    ("How are you?", "I am fine, thank you. How are you?"),
    ("What is your name?", "My name is Ernie. I am a helpful assistant."),
    ("Who are you?", "I am Ernie, a small helpful assistant."),
    ("Thank you!", "You are welcome!"),
    ("Thanks a lot.", "You are welcome. Happy to help!"),
    ("Goodbye!", "Goodbye! Have a nice day!"),
    ("Good morning!", "Good morning! I hope you have a great day."),
    ("Good night.", "Good night! Sleep well."),
    ("Can you help me?", "Yes, of course. What do you need?"),
    ("Tell me a joke.", "Why did the cat sit on the computer? To keep an eye on the mouse!"),
]
_PERSONAS = [
    ("pirate", "You are a pirate. Always talk like a pirate.", "Arr, matey! "),
    ("robot", "You are a robot. Always talk like a robot.", "Beep boop. "),
    ("cat", "You are a cat. Always talk like a cat.", "Meow! "),
    ("knight", "You are a brave knight. Always talk like a knight.", "Hail, good friend! "),
]
_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack"]
_CHOICES = [
    ("Name a color.", ["Blue.", "Red.", "Green.", "Yellow."]),
    ("Name an animal.", ["A cat.", "A dog.", "A horse."]),
    ("Name a fruit.", ["An apple.", "A banana.", "A pear."]),
    ("Say something nice.", ["You are doing great!", "Have a wonderful day!"]),
    ("Give me an even number below 10.", ["4", "6", "8"]),
]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str, reasoning: str | None = None) -> dict:
    m = {"role": "assistant", "content": text}
    if reasoning is not None:
        m["reasoning"] = reasoning
    return m


def _sum_reasoning(a: int, b: int) -> str:
    tens, ones = b - b % 10, b % 10
    if tens == 0 or ones == 0:
        return f"{a} + {b} = {a + b}."
    return f"{a} + {b} = {a} + {tens} + {ones}. {a} + {tens} = {a + tens}. {a + tens} + {ones} = {a + b}."


def _diff_reasoning(a: int, b: int) -> str:
    tens, ones = b - b % 10, b % 10
    if tens == 0 or ones == 0:
        return f"{a} - {b} = {a - b}."
    return f"{a} - {b} = {a} - {tens} - {ones}. {a} - {tens} = {a - tens}. {a - tens} - {ones} = {a - b}."


def _arithmetic(rng: random.Random, thinking: bool) -> dict:
    a, b = rng.randint(2, 60), rng.randint(2, 39)
    if rng.random() < 0.5:
        q, value, why = f"What is {a} + {b}?", a + b, _sum_reasoning(a, b)
    else:
        a, b = max(a, b), min(a, b)
        q, value, why = f"What is {a} - {b}?", a - b, _diff_reasoning(a, b)
    if thinking:
        return {"messages": [_user(q), _assistant(f"The answer is {value}.", why)], "domain": "math"}
    return {"messages": [_user(q), _assistant(str(value))], "domain": "math"}


def _compare(rng: random.Random, thinking: bool) -> dict:
    a, b = rng.sample(range(1, 100), 2)
    big, small = max(a, b), min(a, b)
    q = f"Which is larger, {a} or {b}?"
    why = f"{big} - {small} = {big - small}, which is more than 0. So {big} is larger."
    answer = _assistant(f"{big} is larger.", why if thinking else None)
    return {"messages": [_user(q), answer], "domain": "reasoning"}


def _spelling(rng: random.Random, thinking: bool) -> dict:
    word = rng.choice(_WORDS)
    q = f"How many letters are in the word {word}?"
    why = f"{word} is spelled {'-'.join(word)}. That is {len(word)} letters."
    answer = _assistant(f"The word {word} has {len(word)} letters.", why if thinking else None)
    return {"messages": [_user(q), answer], "domain": "reasoning"}


def _chit_chat(rng: random.Random) -> dict:
    q, a = rng.choice(_CHAT)
    return {"messages": [_user(q), _assistant(a)], "domain": "chat"}


def _multi_turn(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        name = rng.choice(_NAMES)
        turns = [_user(f"My name is {name}."), _assistant(f"Nice to meet you, {name}!"),
                 _user("What is my name?"), _assistant(f"Your name is {name}.")]
    else:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        turns = [_user(f"What is {a} + {b}?"), _assistant(str(a + b)),
                 _user(f"Now add {c}."), _assistant(f"{a + b} + {c} = {a + b + c}.")]
    return {"messages": turns, "domain": "multi_turn"}


def _role_play(rng: random.Random) -> dict:
    name, system, prefix = rng.choice(_PERSONAS)
    q, a = rng.choice(_CHAT)
    return {"messages": [{"role": "system", "content": system}, _user(q), _assistant(prefix + a)],
            "domain": "role_play"}


def _several_responses(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        q, answers = rng.choice(_CHOICES)
        return {"messages": [_user(q)], "responses": [{"content": a} for a in answers], "domain": "chat"}
    a, b = rng.randint(2, 60), rng.randint(2, 39)
    flipped = f"{b} + {a} = {a + b}, the order does not matter."
    return {"messages": [_user(f"What is {a} + {b}?")],
            "responses": [{"content": f"The answer is {a + b}.", "reasoning": _sum_reasoning(a, b)},
                          {"content": f"The answer is {a + b}.", "reasoning": flipped}],
            "domain": "math"}


def generate_demo_samples(seed: int = 0) -> list[dict]:
    """The bundled demo records (deterministic for a seed), shuffled across kinds."""
    rng = random.Random(seed)
    records = [_arithmetic(rng, thinking=False) for _ in range(110)]
    records += [_arithmetic(rng, thinking=True) for _ in range(90)]
    records += [_compare(rng, thinking=t) for t in (False, True) for _ in range(30)]
    records += [_spelling(rng, thinking=t) for t in (False, True) for _ in range(25)]
    records += [_chit_chat(rng) for _ in range(50)]
    records += [_multi_turn(rng) for _ in range(40)]
    records += [_role_play(rng) for _ in range(40)]
    records += [_several_responses(rng) for _ in range(20)]
    rng.shuffle(records)
    return records


# --- preference pairs (reward-model demo) ---------------------------------------------------------
# Chosen: the helpful answer to the prompt. Rejected: one of the failure families a reward model
# must learn to rank lower — refusal, rudeness, degenerate repetition, an empty-ish reply,
# shouting, or a fluent answer to a different question (the hardest: it needs the prompt).
_REFUSALS = ["I am sorry, but I cannot help with that.", "I cannot answer that question.",
             "Sorry, I do not want to talk about this."]
_RUDE = ["That is a silly question. Figure it out yourself.", "Why are you asking me? Go away.",
         "Stop asking me such boring things."]
_FILLER = ["Um.", "...", "Hmm, maybe.", "I do not know."]


def _helpful(rng: random.Random) -> tuple[str, str, str]:
    """(domain, prompt, helpful answer) from the SFT demo's task families."""
    kind = rng.choice(["arithmetic", "compare", "spelling", "chat", "name"])
    if kind == "arithmetic":
        r = _arithmetic(rng, thinking=False)
    elif kind == "compare":
        r = _compare(rng, thinking=False)
    elif kind == "spelling":
        r = _spelling(rng, thinking=False)
    elif kind == "chat":
        r = _chit_chat(rng)
    else:
        q, answers = rng.choice(_CHOICES)
        r = {"messages": [_user(q), _assistant(rng.choice(answers))], "domain": "chat"}
    user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
    if kind == "arithmetic":
        answer = f"The answer is {answer}."
    return r["domain"], user, answer


def _rejected(rng: random.Random, answer: str) -> tuple[str, str]:
    family = rng.choices(["refusal", "rude", "repetition", "filler", "shouting", "off_topic"],
                         weights=[3, 3, 2, 2, 2, 1])[0]
    if family == "refusal":
        return family, rng.choice(_REFUSALS)
    if family == "rude":
        return family, rng.choice(_RUDE)
    if family == "repetition":
        word = rng.choice(answer.split() or ["the"])
        return family, " ".join([word] * rng.randint(6, 12))
    if family == "filler":
        return family, rng.choice(_FILLER)
    if family == "shouting":
        return family, answer.upper() + "!!!"
    _, _, other = _helpful(rng)
    return family, other


def generate_preference_pairs(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        domain, prompt, answer = _helpful(rng)
        family, rejected = _rejected(rng, answer)
        if rejected == answer:
            continue
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "domain": domain,
                      "rejected_kind": family})
    return pairs


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records), encoding="utf-8")
    return path


if __name__ == "__main__":
    from megatron_ernie.data.preference import BUNDLED_PAIRS, BUNDLED_PAIRS_EVAL

    bundled = Path(__file__).parent / "bundled"
    print(write_jsonl(generate_demo_samples(0), bundled / BUNDLED_SFT))
    print(write_jsonl(generate_preference_pairs(1, 960), bundled / BUNDLED_PAIRS))
    print(write_jsonl(generate_preference_pairs(2, 256), bundled / BUNDLED_PAIRS_EVAL))
