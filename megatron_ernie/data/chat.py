r"""Chat rendering for SFT: token ids plus a per-token loss mask from a list of messages.

Messages are dicts `{"role": "system"|"user"|"assistant", "content": str, "reasoning": str?}`:
an optional system message first, then user and assistant turns alternating, starting with user.

Two renderers:
- the tokenizer's own `chat_template`, when it has one (a model directory's template is
  authoritative), see `_template_segments`;
- otherwise the built-in ERNIE 4.5 format (ms-swift's rendering of the released template),
  e.g. for a system prompt and two turns, as one string:
      "<|begin_of_sentence|>You are kind.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>"
      "User: What is 2 + 2?\nAssistant: 4<|end_of_sentence|>"
  (the next `User:` follows the previous turn's eos directly).

Assistant responses (thinking / non-thinking fusion):
- with reasoning:    `<think>\n{reasoning}\n</think>\n\n{answer}` - the reasoning is trained;
- without, when `empty_think`: `<think>\n\n</think>\n\n{answer}` - the empty block is input
  only (loss 0, like the prompt), the answer is trained;
- without, otherwise: `{answer}`.
Loss goes to the assistant responses and their `<|end_of_sentence|>` only (all assistant turns,
or only the last with `loss_on="last_assistant"`); system, user and template text get 0.

The text is tokenized segment by segment (prompt pieces, response pieces), so masks are exact
without character offsets, and a prompt tokenizes the same way in training as at generation
(`prompt_ids`): adjacent prompt pieces are joined before tokenizing, like a prompt string,
and each response is tokenized on its own, like generated text.

Alignment convention: `RenderedSample.loss_mask` is *token-aligned*: `loss_mask[i] == 1` means
token `input_ids[i]` is a target (its prediction from position i-1 counts). The model-side view
is `tokens = input_ids[:-1]`, `labels = input_ids[1:]`, `label_mask = loss_mask[1:]`, so
`label_mask[t]` says whether predicting `labels[t]` counts; `loss_mask[0]` is always 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

from megatron_ernie.data.special_tokens import BOS, EOS, THINK_CLOSE, THINK_OPEN
from megatron_ernie.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
LOSS_ON = ("all_assistant", "last_assistant")
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
USER_PREFIX = "User: "
ASSISTANT_PREFIX = "Assistant: "

Message = dict


class Segment(NamedTuple):
    """A piece of the rendering: text (or ids), whether it gets loss, and whether it is prompt
    text (joined with neighbouring prompt text before tokenizing) or a response piece (tokenized
    on its own, as a model generates it). The split does not depend on `loss_on`, so the ids
    of a conversation are the same whichever turns are trained."""
    part: Union[str, list[int]]
    trained: bool = False
    prompt: bool = True


def _response(part, trained: bool) -> Segment:
    return Segment(part, trained, prompt=False)


class ChatFormatError(DataError):
    """A conversation that cannot be rendered (bad roles, order, or types, or a chat template that
    cannot give a loss mask); callers reading a file prefix it with `file:line`."""


# --- validation ------------------------------------------------------------------------------
def validate_messages(messages: Sequence[Message], *, final_assistant: bool = True) -> None:
    """Check roles, types and turn order; `final_assistant=False` is for generation prompts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        _validate_message(i, m)
    roles = [m["role"] for m in messages]
    if final_assistant and "assistant" not in roles:
        raise ChatFormatError("sample has no assistant turn")
    if "system" in roles[1:]:
        raise ChatFormatError("a system message may only come first")
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(f"turn {i} is {role!r}, expected {expected!r} "
                                  "(user and assistant alternate, user first)")
    last = "assistant" if final_assistant else "user"
    if not turns or turns[-1] != last:
        raise ChatFormatError(f"the last message must be an {last} turn")


def _validate_message(i: int, m) -> None:
    if not isinstance(m, dict):
        raise ChatFormatError(f"message {i} is not an object")
    if "role" not in m:
        raise ChatFormatError(f"message {i} has no role")
    if m["role"] not in ROLES:
        raise ChatFormatError(f"message {i} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(m.get("content"), str):
        raise ChatFormatError(f"message {i} ({m['role']}) needs a string content")
    if m.get("reasoning") is not None:
        if m["role"] != "assistant":
            raise ChatFormatError(f"message {i}: only assistant turns carry reasoning")
        if not isinstance(m["reasoning"], str):
            raise ChatFormatError(f"message {i}: reasoning must be a string")


# --- the rendered sample ---------------------------------------------------------------------
@dataclass(frozen=True)
class RenderedSample:
    input_ids: list[int]
    loss_mask: list[int]   # token-aligned, see the module docstring

    def __post_init__(self):
        assert len(self.input_ids) == len(self.loss_mask)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> list[int]:
        return self.input_ids[:-1]

    @property
    def labels(self) -> list[int]:
        return self.input_ids[1:]

    @property
    def label_mask(self) -> list[int]:
        return self.loss_mask[1:]

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])

    def truncate(self, max_tokens: int) -> "RenderedSample":
        return RenderedSample(self.input_ids[:max_tokens], self.loss_mask[:max_tokens])


# --- responses -------------------------------------------------------------------------------
def has_reasoning(message: Message) -> bool:
    return bool(message.get("reasoning"))


def response_parts(message: Message, empty_think: bool) -> tuple[str, str]:
    """(think block, answer) of an assistant message; the think block is "" when absent.
    An empty or missing reasoning counts as a non-thinking response."""
    if has_reasoning(message):
        return f"{THINK_OPEN}\n{message['reasoning']}\n{THINK_CLOSE}\n\n", message["content"]
    return (EMPTY_THINK if empty_think else ""), message["content"]


def trained_turns(messages: Sequence[Message], loss_on: str) -> set[int]:
    """Indices of the assistant messages that get loss."""
    if loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(turns if loss_on == "all_assistant" else turns[-1:])


# --- built-in ERNIE format -------------------------------------------------------------------
def _builtin_segments(messages, bos_id: int, eos_id: int, trained: set[int], empty_think: bool,
                      generation_prompt: str | None = None) -> list[Segment]:
    """`generation_prompt`: None for a training sample, else the text to put after
    `Assistant: ` ("" or the empty think block)."""
    segments = [Segment([bos_id])]
    for i, m in enumerate(messages):
        if m["role"] == "system":
            segments.append(Segment(m["content"] + "\n"))
        elif m["role"] == "user":
            segments.append(Segment(USER_PREFIX + m["content"] + "\n"))
        else:
            think, answer = response_parts(m, empty_think)
            segments.append(Segment(ASSISTANT_PREFIX))
            # reasoning is part of the response; an empty think block is prompt (input only)
            segments.append(_response(think, i in trained) if has_reasoning(m) else Segment(think))
            segments += [_response(answer, i in trained), _response([eos_id], i in trained)]
    if generation_prompt is not None:
        segments.append(Segment(ASSISTANT_PREFIX + generation_prompt))
    return segments


def render_text(messages: Sequence[Message], *, empty_think: bool = True) -> str:
    """The built-in format as one string (for tokenizer training, logs and docs)."""
    out = [BOS]
    for m in messages:
        if m["role"] == "system":
            out.append(m["content"] + "\n")
        elif m["role"] == "user":
            out.append(USER_PREFIX + m["content"] + "\n")
        else:
            out.append(ASSISTANT_PREFIX + "".join(response_parts(m, empty_think)) + EOS)
    return "".join(out)


def ernie_special_ids(tokenizer) -> tuple[int, int]:
    """ids of `<|begin_of_sentence|>` / `<|end_of_sentence|>` (they must be whole tokens)."""
    ids = []
    for token in (BOS, EOS):
        found = tokenizer.encode(token, add_special_tokens=False)
        if len(found) != 1 or found[0] == tokenizer.unk_token_id:
            raise ChatFormatError(f"tokenizer has no chat_template and no single token for {token}; "
                                  "the built-in ERNIE format needs both")
        ids.append(found[0])
    return ids[0], ids[1]


# --- a tokenizer's own chat template ---------------------------------------------------------
def _template_message(m: Message, empty_think: bool) -> dict:
    """What the template sees: the think block is folded into the assistant content."""
    if m["role"] != "assistant":
        return {"role": m["role"], "content": m["content"]}
    return {"role": "assistant", "content": "".join(response_parts(m, empty_think))}


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_turn(piece: str, tokenizer) -> int:
    """Length of a rendered response up to its last end-of-turn marker, so that template text
    after it (e.g. a newline before the next turn) is not trained; the whole piece if none."""
    ends = [piece.rfind(e) + len(e) for e in {tokenizer.eos_token, EOS} if e and e in piece]
    return max(ends) if ends else len(piece)


def _response_segments(piece: str, m: Message, empty_think: bool, trained: bool) -> list[Segment]:
    """Split a rendered response so that an empty think block stays untrained prompt text."""
    if has_reasoning(m) or not empty_think or EMPTY_THINK not in piece:
        return [_response(piece, trained)]
    cut = piece.index(EMPTY_THINK) + len(EMPTY_THINK)
    return [Segment(piece[:cut]), _response(piece[cut:], trained)]


def _template_segments(messages, tokenizer, trained: set[int], empty_think: bool,
                       generation_prompt: str | None = None) -> list[Segment]:
    """Incremental rendering: the prompt before assistant turn k is `render(messages[:k], gen
    prompt)`, its response is what `render(messages[:k+1])` adds (cut after the end-of-turn
    marker). A turn's split is usable when both are a prefix of the whole rendering; a trained
    turn must be (raises otherwise). Templates that rewrite earlier turns (e.g. drop old
    reasoning) leave those turns inside the prompt text, so `loss_on="last_assistant"` works.
    Limitation: whatever a template adds to an assistant message beyond its generation prompt
    (e.g. an assistant header it only emits there) counts as response and is trained."""
    msgs = [_template_message(m, empty_think) for m in messages]
    whole = _apply_template(tokenizer, msgs, add_generation_prompt=generation_prompt is not None)
    whole += generation_prompt or ""
    segments: list[Segment] = []
    done = 0   # length of the rendered text already turned into segments
    for k in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        prompt = _apply_template(tokenizer, msgs[:k], add_generation_prompt=True)
        full = _apply_template(tokenizer, msgs[: k + 1], add_generation_prompt=False)
        piece = full[len(prompt):]
        piece = piece[: _end_of_turn(piece, tokenizer)]
        if not (full.startswith(prompt) and whole.startswith(prompt + piece) and len(prompt) >= done):
            if k not in trained:
                continue
            raise ChatFormatError(f"chat template is not prefix-consistent at assistant turn {k}; "
                                  "cannot derive the loss mask (try loss_on='last_assistant')")
        segments.append(Segment(whole[done:len(prompt)]))
        segments += _response_segments(piece, messages[k], empty_think, k in trained)
        done = len(prompt) + len(piece)
    segments.append(Segment(whole[done:]))
    return segments


# --- tokenizing segments ---------------------------------------------------------------------
def _join_prompt_text(segments: list[Segment]) -> list[Segment]:
    """Join adjacent prompt text so a prompt tokenizes as one string, as at generation."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg.part, str) and not seg.part:
            continue
        last = out[-1] if out else None
        if last and seg.prompt and last.prompt and isinstance(seg.part, str) and isinstance(last.part, str):
            out[-1] = Segment(last.part + seg.part)
        else:
            out.append(seg)
    return out


def encode_segments(segments: list[Segment], tokenizer) -> RenderedSample:
    ids: list[int] = []
    mask: list[int] = []
    for part, trained, _ in _join_prompt_text(segments):
        piece = list(part) if isinstance(part, list) else tokenizer.encode(part, add_special_tokens=False)
        ids += piece
        mask += [int(trained)] * len(piece)
    return RenderedSample(ids, mask)


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(messages: Sequence[Message], tokenizer, *, empty_think: bool = True,
                    loss_on: str = "all_assistant") -> RenderedSample:
    """A training sample: ids of the whole conversation and the token-aligned loss mask."""
    validate_messages(messages)
    trained = trained_turns(messages, loss_on)
    if uses_chat_template(tokenizer):
        segments = _template_segments(messages, tokenizer, trained, empty_think)
    else:
        bos_id, eos_id = ernie_special_ids(tokenizer)
        segments = _builtin_segments(messages, bos_id, eos_id, trained, empty_think)
    return encode_segments(segments, tokenizer)


def prompt_ids(messages: Sequence[Message], tokenizer, *, thinking: bool = True,
               empty_think: bool = True) -> list[int]:
    """Generation prompt for a conversation ending with a user turn, tokenized exactly as the
    prompt part of a training sample. `thinking=False` appends the empty think block (the
    non-thinking mode of a fused model); `empty_think` renders earlier non-thinking assistant
    turns as in training."""
    validate_messages(messages, final_assistant=False)
    generation = "" if thinking else EMPTY_THINK
    if uses_chat_template(tokenizer):
        segments = _template_segments(messages, tokenizer, set(), empty_think, generation)
    else:
        bos_id, eos_id = ernie_special_ids(tokenizer)
        segments = _builtin_segments(messages, bos_id, eos_id, set(), empty_think, generation)
    return encode_segments(segments, tokenizer).input_ids
