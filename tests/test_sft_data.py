"""SFT data side: demo tokenizer, chat rendering and loss masks, JSONL validation, packing,
attention masks and the resumable global-batch order."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
import torch

from megatron_ernie.data.chat import EMPTY_THINK, RenderedSample, prompt_ids, render_messages
from megatron_ernie.data.sft import (
    DataError, GlobalBatches, SFTDataset, block_causal_mask, bundled_sft_path, collate,
    load_samples, render_sample,
)
from megatron_ernie.data.demo_data import generate_demo_samples
from megatron_ernie.data.tokenizer import build_demo_tokenizer, demo_tokenizer, load_tokenizer

BOS, EOS = "<|begin_of_sentence|>", "<|end_of_sentence|>"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def trained_spans(tok, sample: RenderedSample) -> list[str]:
    """Decoded runs of consecutive loss tokens."""
    spans, run = [], []
    for i, m in zip(sample.input_ids, sample.loss_mask):
        if m:
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    if run:
        spans.append(tok.decode(run))
    return spans


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def chat(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


# --- tokenizer -------------------------------------------------------------------------------
def test_demo_tokenizer_special_ids_and_round_trip(tok, tmp_path):
    assert (tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert tok.convert_tokens_to_ids(["<unk>", BOS, EOS]) == [0, 1, 2]
    assert len(tok) <= 512
    ids = enc(tok, "x<think>y</think>z")
    assert ids.count(3) == 1 and ids.count(4) == 1 and len(enc(tok, "<think>")) == 1 and len(enc(tok, "</think>")) == 1
    text = f"{BOS}User: What is 17 + 25?\nAssistant: <think>\n17 + 25 = 42.\n</think>\n\nThe answer is 42.{EOS}"
    ids = enc(tok, text)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    # bos/eos are stripped by skip_special_tokens, the think markers are kept on purpose
    assert tok.decode(ids, skip_special_tokens=True) == text[len(BOS):-len(EOS)]
    tok.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path).encode(text, add_special_tokens=False) == ids


def test_build_demo_tokenizer_is_deterministic_and_bounded():
    texts = [f"User: What is {a} + {b}?\nAssistant: {a + b}" for a in range(30) for b in range(10)]
    a, b = build_demo_tokenizer(texts, vocab_size=300), build_demo_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab() and len(a) <= 300
    assert demo_tokenizer() is not demo_tokenizer()          # fresh objects, cached training
    assert demo_tokenizer().get_vocab() == demo_tokenizer().get_vocab()


# --- built-in ERNIE format -------------------------------------------------------------------
def test_ernie_format_two_turns_exact_string_and_mask(tok):
    msgs = [{"role": "system", "content": "You are kind."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    r = render_messages(msgs, tok, empty_think=False)
    assert tok.decode(r.input_ids) == (f"{BOS}You are kind.\nUser: Hi\nAssistant: Hello!{EOS}"
                                       f"User: What is 2 + 2?\nAssistant: 4{EOS}")
    prompt1 = [1] + enc(tok, "You are kind.\nUser: Hi\nAssistant: ")
    answer1 = enc(tok, "Hello!") + [2]
    prompt2 = enc(tok, "User: What is 2 + 2?\nAssistant: ")
    answer2 = enc(tok, "4") + [2]
    assert r.input_ids == prompt1 + answer1 + prompt2 + answer2
    assert r.loss_mask == [0] * len(prompt1) + [1] * len(answer1) + [0] * len(prompt2) + [1] * len(answer2)
    # model-side view: labels are the next tokens, the mask is aligned to labels
    assert r.tokens == r.input_ids[:-1] and r.labels == r.input_ids[1:] and r.label_mask == r.loss_mask[1:]
    last = render_messages(msgs, tok, empty_think=False, loss_on="last_assistant")
    assert last.input_ids == r.input_ids and trained_spans(tok, last) == [f"4{EOS}"]


def test_thinking_reasoning_is_trained_empty_think_is_not(tok):
    think = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "The answer is 5.", "reasoning": "2 + 3 = 5."}]
    r = render_messages(think, tok)
    assert trained_spans(tok, r) == [f"<think>\n2 + 3 = 5.\n</think>\n\nThe answer is 5.{EOS}"]

    plain = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    r = render_messages(plain, tok, empty_think=True)
    assert tok.decode(r.input_ids) == f"{BOS}User: What is 2 + 3?\nAssistant: {EMPTY_THINK}5{EOS}"
    start = r.input_ids.index(tok.convert_tokens_to_ids("<think>"))
    end = r.input_ids.index(tok.convert_tokens_to_ids("</think>"))
    answer_at = len(r.input_ids) - len(enc(tok, "5")) - 1
    assert tok.decode(r.input_ids[start:answer_at]) == EMPTY_THINK
    assert r.loss_mask[start:answer_at] == [0] * (answer_at - start) and end < answer_at
    assert r.loss_mask[answer_at:] == [1] * (len(r.input_ids) - answer_at)
    assert trained_spans(tok, r) == [f"5{EOS}"]
    # the generation prompt of the non-thinking mode is exactly the untrained prefix
    assert prompt_ids(plain[:1], tok, thinking=False) == r.input_ids[:answer_at]
    assert "<think>" not in tok.decode(render_messages(plain, tok, empty_think=False).input_ids)
    multi = plain + [{"role": "user", "content": "And 3 + 3?"}]
    full = render_messages(multi + [{"role": "assistant", "content": "6"}], tok)
    assert prompt_ids(multi, tok, thinking=False) == full.input_ids[: len(prompt_ids(multi, tok, thinking=False))]


def test_per_sample_thinking_override(tok, tmp_path):
    records = [chat("Hi", "Hello!", thinking=True), chat("Hi", "Hello!", thinking=False), chat("Hi", "Hello!")]
    path = write(tmp_path, records)
    samples = load_samples(path)
    texts = [tok.decode(render_sample(s, tok, empty_think=False, loss_on="all_assistant").input_ids) for s in samples]
    assert [EMPTY_THINK in t for t in texts] == [False, True, False]
    texts = [tok.decode(render_sample(s, tok, empty_think=True, loss_on="all_assistant").input_ids) for s in samples]
    assert [EMPTY_THINK in t for t in texts] == [False, True, True]


def test_chat_template_wins_and_masks_stay_exact(tok):
    t = demo_tokenizer()
    t.chat_template = TEMPLATE
    msgs = [{"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4", "reasoning": "2 + 2 = 4."}]
    r = render_messages(msgs, t, empty_think=True)
    assert tok.decode(r.input_ids) == (
        f"{BOS}<|system|>Be nice.\n<|user|>Hi\n<|assistant|>{EMPTY_THINK}Hello!{EOS}\n"
        f"<|user|>What is 2 + 2?\n<|assistant|><think>\n2 + 2 = 4.\n</think>\n\n4{EOS}\n")
    # the empty think block and the newline after each eos are input only
    assert trained_spans(tok, r) == [f"Hello!{EOS}", f"<think>\n2 + 2 = 4.\n</think>\n\n4{EOS}"]
    assert trained_spans(tok, render_messages(msgs, t, loss_on="last_assistant")) == [
        f"<think>\n2 + 2 = 4.\n</think>\n\n4{EOS}"]
    assert tok.decode(prompt_ids(msgs[:2], t)) == f"{BOS}<|system|>Be nice.\n<|user|>Hi\n<|assistant|>"
    # a generation prompt after history tokenizes exactly like that prefix of the training sample
    assert r.input_ids[: len(prompt_ids(msgs[:4], t))] == prompt_ids(msgs[:4], t)


def test_chat_template_that_rewrites_history(tok):
    """Templates that render earlier turns differently (e.g. drop old reasoning) cannot give a
    mask for every turn, but the last turn still works."""
    t = demo_tokenizer()
    t.chat_template = TEMPLATE.replace("m['content'] + eos_token", "(m['content'] if loop.last else 'old') + eos_token")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    with pytest.raises(ValueError, match="not prefix-consistent"):
        render_messages(msgs, t)
    r = render_messages(msgs, t, empty_think=False, loss_on="last_assistant")
    assert tok.decode(r.input_ids) == f"{BOS}<|user|>Hi\n<|assistant|>old{EOS}\n<|user|>Bye\n<|assistant|>Bye!{EOS}\n"
    assert trained_spans(tok, r) == [f"Bye!{EOS}"]


# --- JSONL validation ------------------------------------------------------------------------
def test_malformed_json_names_file_and_line(tok, tmp_path):
    path = write(tmp_path, [chat("a", "b"), "", '{"messages": [}'])
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        SFTDataset(path, tok, 64)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"content": "hi"}]}, "no role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "string content"),
    ({"messages": [{"role": "user", "content": "hi", "reasoning": "r"}, {"role": "assistant", "content": "x"}]},
     "only assistant turns carry reasoning"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "responses": ["y"]}, "must end with a user turn"),
])
def test_bad_samples_name_file_and_line(tmp_path, record, message):
    path = write(tmp_path, [chat("a", "b"), record])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        load_samples(path)


def test_empty_and_missing_files(tok, tmp_path):
    empty = write(tmp_path, ["", "  "], name="empty.jsonl")
    with pytest.raises(DataError, match=f"{empty}: no samples"):
        SFTDataset(empty, tok, 64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        SFTDataset(tmp_path / "missing.jsonl", tok, 64)


def test_responses_expand_to_samples(tmp_path):
    record = {"messages": [{"role": "user", "content": "Name a color."}],
              "responses": [{"content": "Blue."}, "Red.", {"content": "Green.", "reasoning": "Think."}],
              "domain": "chat"}
    samples = load_samples(write(tmp_path, [record]))
    assert [s.messages[-1]["content"] for s in samples] == ["Blue.", "Red.", "Green."]
    assert samples[2].messages[-1]["reasoning"] == "Think." and {s.domain for s in samples} == {"chat"}


def test_overlong_truncate_vs_drop(tok, tmp_path):
    long_answer = " ".join(["word"] * 60)
    long_prompt = " ".join(["word"] * 60)
    path = write(tmp_path, [chat("Hi", "Hello!"), chat("Hi", long_answer), chat(long_prompt, "ok")])
    trunc = SFTDataset(path, tok, 32, overlong="truncate")
    # the long answer is cut, the long prompt leaves nothing to learn and is dropped
    assert (trunc.stats["samples"], trunc.stats["truncated"], trunc.stats["dropped_overlong"]) == (2, 1, 1)
    assert [d.truncated for d in trunc.documents] == [False, True]
    assert trunc.documents[1].num_tokens == 33
    drop = SFTDataset(path, tok, 32, overlong="drop")
    assert (drop.stats["samples"], drop.stats["truncated"], drop.stats["dropped_overlong"]) == (1, 0, 2)
    for ds in (trunc, drop):
        s = ds.stats
        assert s["tokens"] == sum(d.num_tokens - 1 for d in ds.documents)
        assert s["loss_tokens"] == sum(d.num_loss_tokens for d in ds.documents) == int(ds._data["loss_mask"].sum())
        assert s["padding_tokens"] == s["packed_sequences"] * 32 - s["tokens"]
    with pytest.raises(DataError, match="no samples left"):
        SFTDataset(write(tmp_path, [chat(long_prompt, "ok")], "long.jsonl"), tok, 32, overlong="drop")


# --- packing ---------------------------------------------------------------------------------
def unpack_row(row) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token-aligned loss mask) of every document in a row."""
    docs = []
    for d in sorted(set(row["doc_ids"].tolist()) - {-1}):
        sel = row["doc_ids"] == d
        tokens, labels = row["tokens"][sel].tolist(), row["labels"][sel].tolist()
        assert tokens[1:] == labels[:-1]                     # labels are the next tokens
        docs.append((tokens + labels[-1:], [0] + row["loss_mask"][sel].int().tolist()))
    return docs


def test_packing_layout_and_no_lost_data(tok, tmp_path):
    records = [chat(f"What is {a} + {a}?", str(2 * a)) for a in range(12)]
    records += [chat("Hi", "Hello! How can I help you today?", thinking=True)]
    path = write(tmp_path, records)
    seq = 48
    ds = SFTDataset(path, tok, seq, pack=True, seed=3)
    expected = [render_sample(s, tok, empty_think=True, loss_on="all_assistant") for s in load_samples(path)]
    assert len(ds) < len(expected) and ds.stats["packed_sequences"] == len(ds)
    found = []
    for i in range(len(ds)):
        row = ds[i]
        assert all(v.shape == (seq,) for v in row.values())
        assert row["loss_mask"].dtype == torch.float32 and row["tokens"].dtype == torch.long
        doc, pos = row["doc_ids"], row["position_ids"]
        real = doc != -1
        n_real = int(real.sum())
        assert bool(real[:n_real].all()) and not bool(real[n_real:].any())   # padding at the end
        assert torch.equal(doc[:n_real], doc[:n_real].sort().values)        # 0, 0, 1, 1, 1, ...
        for d in doc[:n_real].unique():
            assert torch.equal(pos[doc == d], torch.arange(int((doc == d).sum())))   # restart per doc
        pad = ~real
        assert not row["loss_mask"][pad].any() and not row["tokens"][pad].any() and not row["labels"][pad].any()
        found += unpack_row(row)
    as_key = lambda docs: sorted((tuple(i), tuple(m)) for i, m in docs)   # noqa: E731
    assert as_key(found) == as_key([(r.input_ids, r.loss_mask) for r in expected])   # each exactly once
    assert SFTDataset(path, tok, seq, seed=3).rows == ds.rows                       # deterministic

    flat = SFTDataset(path, tok, seq, pack=False)
    assert len(flat) == len(expected) and flat.stats["samples"] == len(expected)
    for i, r in enumerate(expected):                                                  # file order
        row = flat[i]
        assert unpack_row(row) == [(r.input_ids, r.loss_mask)]
        assert row["position_ids"][: len(r) - 1].tolist() == list(range(len(r) - 1))


def test_block_causal_mask_by_hand():
    m = block_causal_mask(torch.tensor([0, 0, 1, 1, 1, -1]))
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m[0, 0], ~allowed)                    # True = masked out
    two = block_causal_mask(torch.tensor([[0, 1, 1, -1], [0, 0, -1, -1]]))
    assert two.shape == (2, 1, 4, 4)
    assert not two[1, 0, 3, 3] and two[1, 0, 3, 2] and two[1, 0, 2, 1]   # pads see only themselves
    assert not two[0, 0, 2, 1] and two[0, 0, 1, 0] and two[0, 0, 3, 1]
    assert not two.all(-1).any()                             # no fully masked row


def test_collate_stacks_rows(tok):
    ds = SFTDataset(bundled_sft_path(), tok, 64)
    batch = collate([ds[0], ds[1], ds[2]], attention_mask=True)
    assert batch["tokens"].shape == (3, 64) and batch["attention_mask"].shape == (3, 1, 64, 64)
    assert torch.equal(batch["attention_mask"], block_causal_mask(batch["doc_ids"]))
    assert torch.equal(ds.batch([0, 1, 2])["labels"], batch["labels"])


# --- global batches --------------------------------------------------------------------------
def test_global_batches_deterministic_and_resumable():
    n, gbs = 10, 4
    run = GlobalBatches(n, gbs, seed=5)
    first = list(islice(run, 8))
    assert run.consumed_samples == 32 and run.epoch == 3
    assert first == list(islice(GlobalBatches(n, gbs, seed=5), 8))
    assert first != list(islice(GlobalBatches(n, gbs, seed=6), 8))
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))     # each epoch a permutation
    assert flat[:10] != flat[10:20]                                        # reshuffled per epoch
    for k in (8, 7, 13):                                                   # resume anywhere, across epochs
        resumed = list(islice(GlobalBatches(n, gbs, seed=5, consumed_samples=k), 3))
        assert [i for b in resumed for i in b] == flat[k:k + 12]


# --- bundled demo data -----------------------------------------------------------------------
def test_bundled_demo_data(tok):
    path = bundled_sft_path()
    raw = path.read_bytes()
    assert len(raw) < 300_000 and raw.isascii()
    assert [json.loads(line) for line in raw.decode().splitlines()] == generate_demo_samples(0)
    samples = load_samples(path)
    assert 300 <= len(samples) <= 600
    kinds = Counter(s.domain for s in samples)
    assert {"math", "reasoning", "chat", "multi_turn", "role_play"} <= set(kinds)
    assert any("reasoning" in s.messages[-1] for s in samples)
    assert any(s.messages[0]["role"] == "system" for s in samples)
    ds = SFTDataset(path, tok, 128)
    assert ds.stats["samples"] == len(samples) and ds.stats["dropped_overlong"] == 0
    assert int(ds._data["tokens"].max()) < 512
