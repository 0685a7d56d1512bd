"""Prompt pairs: a shared context and two one-token endings, checked and tokenised."""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np


class PromptError(ValueError):
    """A prompt pair that cannot be used as the study requires."""


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """Context ids ``[T_ctx]`` and the token ids of the two endings (A at alpha 0, B at 1)."""

    context: str
    ending_a: str
    ending_b: str
    context_ids: np.ndarray
    token_a: int
    token_b: int

    @property
    def label(self) -> str:
        return f"{self.ending_a.strip()}->{self.ending_b.strip()}"


def parse_pairs(spec: str) -> List[Tuple[str, str]]:
    """``"big:in,big:large"`` -> ``[(" big", " in"), (" big", " large")]``.

    Endings are joined to the context with one space, as in the study ("The house was" +
    " big"); write ``\\:`` or ``\\,`` for literal separators.
    """
    pairs = []
    for item in _split(spec, ","):
        parts = _split(item, ":")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise PromptError(f"pair {item!r}: expected 'endingA:endingB', e.g. 'big:in'.")
        pair = tuple(" " + p.strip() for p in parts)
        if pair in pairs:
            raise PromptError(f"pair {item.strip()!r} is given twice (positions "
                              f"{pairs.index(pair) + 1} and {len(pairs) + 1}); each pair once.")
        pairs.append(pair)
    if not pairs:
        raise PromptError("no prompt pairs given; e.g. --pairs=big:in,big:large")
    return pairs


def _split(text: str, sep: str) -> List[str]:
    out, cur, esc = [], "", False
    for ch in text:
        if esc:
            cur, esc = cur + ch, False
        elif ch == "\\":
            esc = True
        elif ch == sep:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur or out:
        out.append(cur)
    return [o for o in out if o != ""] if sep == "," else out


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, ending_a: str, ending_b: str,
                max_positions: int) -> PromptPair:
    """Tokenises ``context`` and checks that ``context + ending`` adds exactly one token each.

    Raises :class:`PromptError` for an empty or over-long context, identical endings, or an
    ending that is not exactly one token after the context (showing how it tokenises).
    """
    if not context or not context.strip():
        raise PromptError("the context is empty; give the shared prompt, e.g. 'The house was'.")
    if ending_a == ending_b:
        raise PromptError(f"the two endings are identical ({ending_a!r}); a pair needs two tokens.")
    ctx = _ids(tokenizer, context)
    if len(ctx) + 1 > max_positions:
        raise PromptError(f"the context is {len(ctx)} tokens; with its ending that exceeds the "
                          f"model's {max_positions} positions. Shorten the context.")
    tokens = []
    for ending in (ending_a, ending_b):
        full = _ids(tokenizer, context + ending)
        if full[: len(ctx)] != ctx or len(full) != len(ctx) + 1:
            pieces = [tokenizer.decode([t]) for t in full[len(ctx):]] if full[: len(ctx)] == ctx \
                else [tokenizer.decode([t]) for t in full]
            hint = (f" Try the leading-space form {' ' + ending.strip()!r}."
                    if not ending.startswith(" ") else " Choose an ending that is a single token.")
            raise PromptError(
                f"ending {ending!r} is not exactly one token after {context!r}: it tokenises as "
                f"{pieces}.{hint}")
        tokens.append(full[-1])
    if tokens[0] == tokens[1]:
        raise PromptError(f"endings {ending_a!r} and {ending_b!r} are the same token.")
    return PromptPair(context, ending_a, ending_b, np.asarray(ctx, np.int32), tokens[0], tokens[1])


def encode_pairs(tokenizer, context: str, pairs: Sequence[Tuple[str, str]],
                 max_positions: int) -> List[PromptPair]:
    return [encode_pair(tokenizer, context, a, b, max_positions) for a, b in pairs]
