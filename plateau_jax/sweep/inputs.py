"""Prompt-pair inputs: pairs files (JSONL or CSV) and generators for the common designs.

A pairs file has one pair per row: ``context``, ``ending_a`` (alpha = 0), ``ending_b`` (alpha = 1).

* JSONL (``.jsonl``/``.json``): one object per line, ``{"context": ..., "ending_a": ..., "ending_b": ...}``
  (``"a"``/``"b"`` accepted for the endings); blank lines are ignored.
* CSV (``.csv``; ``.tsv`` tab-separated): a header naming the columns ``context,ending_a,ending_b``
  (``a``/``b`` accepted). Quote fields to keep leading spaces: ``"The house was"," big"," in"``.

Endings are appended to the context verbatim (write the leading space: ``" big"``) and must add
exactly one token each (:func:`plateau_jax.plateaus.prompts.encode_pair`). A row that is
malformed or fails that check is reported as ``(line, reason)`` and skipped; no row is ever
altered.

Generators return ``(rows, skipped)``: rows ready for :func:`write_pairs_jsonl`, and the
candidates they had to drop with the reason (e.g. a token that does not survive decoding and
re-tokenising after the context).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from plateau_jax.plateaus.prompts import PromptError, PromptPair, encode_pair


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One row of a pairs file (``line`` is 1-based; 0 for generated rows not yet written)."""

    context: str
    ending_a: str
    ending_b: str
    line: int = 0

    def as_json(self) -> dict:
        return {"context": self.context, "ending_a": self.ending_a, "ending_b": self.ending_b}


@dataclasses.dataclass(frozen=True)
class RowError:
    line: int
    reason: str
    text: str = ""

    def as_json(self) -> dict:
        return {"line": self.line, "reason": self.reason, "row": self.text}


_KEYS = {"context": ("context",), "ending_a": ("ending_a", "a"), "ending_b": ("ending_b", "b")}


def _pick(obj: dict, field: str):
    for k in _KEYS[field]:
        if k in obj:
            return obj[k]
    raise KeyError(field)


def _row_from_mapping(obj, line: int, text: str):
    if not isinstance(obj, dict):
        return RowError(line, f"expected an object with context, ending_a, ending_b; got "
                              f"{type(obj).__name__}", text)
    vals = {}
    for field in _KEYS:
        try:
            v = _pick(obj, field)
        except KeyError:
            return RowError(line, f"missing field {field!r} (fields: context, ending_a, ending_b)",
                            text)
        if not isinstance(v, str):
            return RowError(line, f"field {field!r} must be a string; got {type(v).__name__}", text)
        vals[field] = v
    return PairRow(vals["context"], vals["ending_a"], vals["ending_b"], line)


def parse_pairs_text(text: str, fmt: str) -> Tuple[List[PairRow], List[RowError]]:
    """Parses pairs from ``text`` in ``fmt`` ("jsonl", "csv" or "tsv"); never raises on bad rows."""
    rows, errors = [], []
    if fmt == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(RowError(i, f"invalid JSON ({e.msg} at column {e.colno})", line))
                continue
            res = _row_from_mapping(obj, i, line)
            (errors if isinstance(res, RowError) else rows).append(res)
        return rows, errors
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"pairs format {fmt!r}: expected jsonl, csv or tsv.")
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    header, start = None, 1
    for rec in reader:
        line, start = start, reader.line_num + 1
        raw = text.splitlines()[line - 1] if line - 1 < len(text.splitlines()) else ""
        if not rec or all(not f.strip() for f in rec):
            continue
        if header is None:
            header = [h.strip().lower() for h in rec]
            missing = [f for f, keys in _KEYS.items() if not any(k in header for k in keys)]
            if missing:
                errors.append(RowError(line, f"header must name the columns context, ending_a, "
                                             f"ending_b; missing {missing}", raw))
                return rows, errors
            continue
        if len(rec) != len(header):
            errors.append(RowError(line, f"expected {len(header)} fields, got {len(rec)}", raw))
            continue
        res = _row_from_mapping(dict(zip(header, rec)), line, raw)
        (errors if isinstance(res, RowError) else rows).append(res)
    return rows, errors


def detect_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
           ".tsv": "tsv"}.get(ext)
    if fmt is None:
        raise ValueError(f"pairs file {path!r}: unknown extension {ext!r}; use .jsonl or .csv "
                         "(or .tsv).")
    return fmt


def read_pairs_file(path: str) -> Tuple[List[PairRow], List[RowError]]:
    """Reads a pairs file (format from the extension). Returns (rows, errors)."""
    with open(path, encoding="utf-8") as f:
        return parse_pairs_text(f.read(), detect_format(path))


def encode_rows(tokenizer, rows: Sequence[PairRow], max_positions: int
                ) -> Tuple[List[Tuple[int, PromptPair]], List[RowError]]:
    """Tokenises and checks rows; returns ([(line, PromptPair)], errors).

    A row whose pair (same context tokens, same two ending tokens) was seen on an earlier line is
    an error ("duplicate of line N"): counting one pair twice would weight it double."""
    good, errors, seen = [], [], {}
    for row in rows:
        try:
            pair = encode_pair(tokenizer, row.context, row.ending_a, row.ending_b, max_positions)
        except PromptError as e:
            errors.append(RowError(row.line, str(e), json.dumps(row.as_json())))
            continue
        key = (tuple(int(t) for t in pair.context_ids), pair.token_a, pair.token_b)
        if key in seen:
            errors.append(RowError(row.line, f"duplicate of line {seen[key]} (the same pair); "
                                             "each pair is used once", json.dumps(row.as_json())))
            continue
        seen[key] = row.line
        good.append((row.line, pair))
    return good, errors


def write_pairs_jsonl(path: str, rows: Iterable[PairRow]) -> None:
    from plateau_jax.files import atomic_write_bytes

    data = "".join(json.dumps(r.as_json(), ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode("utf-8"))


# ----------------------------------------------------------------------------- generators

def _token_row(tokenizer, context: str, ctx_ids, tok_a: int, tok_b: int, max_positions: int):
    """A row for two token ids after ``context``, or the reason it cannot be written as text."""
    ea, eb = tokenizer.decode([int(tok_a)]), tokenizer.decode([int(tok_b)])
    try:
        p = encode_pair(tokenizer, context, ea, eb, max_positions)
    except PromptError as e:
        return None, str(e)
    if list(p.context_ids) != list(ctx_ids) or (p.token_a, p.token_b) != (int(tok_a), int(tok_b)):
        return None, (f"tokens {int(tok_a)}/{int(tok_b)} ({ea!r}/{eb!r}) do not survive decoding and "
                      "re-tokenising after the context")
    return PairRow(context, ea, eb), None


def _next_logits(model, ctx_ids):
    from plateau_jax.model.forward import forward

    logits, _ = forward(model, np.asarray(ctx_ids, np.int32)[None])
    return np.asarray(logits[0], np.float64)  # [T, V]


def topk_pairs(model, context: str, k: int = 10, pairs: str = "all"):
    """Pairs among the model's top-``k`` next tokens after ``context``.

    ``pairs="all"``: every unordered pair (i < j; A = the more likely token); ``"top1"``: the
    top token against each of the others. Returns (rows, skipped).
    """
    tok = model.tokenizer
    ctx = list(tok(context, add_special_tokens=False)["input_ids"])
    if not ctx:
        raise PromptError("the context is empty.")
    logits = _next_logits(model, ctx)[-1]
    top = [int(t) for t in np.argsort(-logits, kind="stable")[:k]]
    combos = ([(top[i], top[j]) for i in range(len(top)) for j in range(i + 1, len(top))]
              if pairs == "all" else [(top[0], t) for t in top[1:]])
    rows, skipped = [], []
    for ta, tb in combos:
        row, why = _token_row(tok, context, ctx, ta, tb, model.config.n_positions)
        (rows.append(row) if row else skipped.append((f"{ta}/{tb}", why)))
    return rows, skipped


def random_pairs(model, contexts: Sequence[str], n: int, seed: int = 0,
                 words: Optional[Sequence[str]] = None, max_tries: int = 100):
    """``n`` pairs of distinct random single-token endings, contexts drawn in turn from
    ``contexts``. Endings come from ``words`` (each used as ``" " + word``; words that are not a
    single token after the context are skipped and reported) or, without a word list, from the
    vocabulary tokens that start with a space followed by a letter. Deterministic in ``seed``."""
    tok = model.tokenizer
    rng = np.random.default_rng(seed)
    if not contexts:
        raise PromptError("no contexts given.")
    ctx_ids = {c: list(tok(c, add_special_tokens=False)["input_ids"]) for c in contexts}
    skipped = []
    if words is not None:
        cands = [" " + w.strip() for w in words if w.strip()]
    else:
        cands = []
        for t in range(model.config.vocab_size):
            s = tok.decode([t])
            if len(s) > 1 and s[0] == " " and s[1].isalpha():
                cands.append(s)
    if len(cands) < 2:
        raise PromptError("fewer than two candidate endings.")
    rows, tries, used = [], 0, set()
    while len(rows) < n and tries < max_tries * max(n, 1):
        tries += 1
        c = contexts[len(rows) % len(contexts)]
        i, j = rng.choice(len(cands), size=2, replace=False)
        if (c, i, j) in used:  # draw again: a pair is used once
            continue
        used.add((c, i, j))
        try:
            encode_pair(tok, c, cands[i], cands[j], model.config.n_positions)
        except PromptError as e:
            skipped.append((f"{cands[i]!r}/{cands[j]!r}", str(e)))
            continue
        rows.append(PairRow(c, cands[i], cands[j]))
    return rows, skipped


def text_pairs(model, text: str, max_context: int = 32, min_context: int = 2,
               stride: int = 1, limit: Optional[int] = None):
    """Pairs from running text: at each position, the actual next token (A) against the model's
    top prediction other than it (B).

    The text is tokenised and cut into non-overlapping windows of ``max_context + 1`` tokens; within
    a window, every ``stride``-th position ``t >= min_context`` gives context ``window[:t]``.
    Positions whose context or tokens do not survive decoding and re-tokenising are skipped
    with the reason. Returns (rows, skipped).
    """
    tok = model.tokenizer
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    width = min(max_context + 1, model.config.n_positions)
    rows, skipped = [], []
    for w0 in range(0, len(ids) - 1, width):
        win = ids[w0:w0 + width]
        if len(win) <= min_context:
            break
        logits = _next_logits(model, win)
        for t in range(min_context, len(win), stride):
            actual = win[t]
            order = np.argsort(-logits[t - 1], kind="stable")
            alt = int(order[0]) if int(order[0]) != actual else int(order[1])
            context = tok.decode(win[:t])
            row, why = _token_row(tok, context, win[:t], actual, alt, model.config.n_positions)
            (rows.append(row) if row else skipped.append((f"token {w0 + t}", why)))
            if limit is not None and len(rows) >= limit:
                return rows, skipped
    return rows, skipped
