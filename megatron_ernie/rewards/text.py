"""Text helpers shared by the reward sources."""
from __future__ import annotations

from megatron_ernie.data.special_tokens import THINK_CLOSE, THINK_OPEN


def strip_think(response: str) -> str:
    """A response's final answer, without its reasoning: the text after the last `</think>`
    (also when the chat template put the opening tag in the prompt); a response whose `<think>`
    never closes never left its reasoning, so what precedes the tag is all there is (usually "")."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in response:
        return response.split(THINK_OPEN, 1)[0].strip()
    return response.strip()
