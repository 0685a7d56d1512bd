"""Pairs files (JSONL, CSV) with bad rows reported by line, and the pair generators."""

import json

import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax.sweep import inputs


def test_jsonl_rows_and_errors():
    text = "\n".join([
        json.dumps({"context": "The house was", "ending_a": " big", "ending_b": " in"}),
        "",
        "[1, 2",
        json.dumps({"context": "The house was", "a": " big", "b": " large"}),
        json.dumps({"context": "The house was", "ending_a": " big"}),
        json.dumps({"context": "The house was", "ending_a": 3, "ending_b": " in"}),
        json.dumps(["The house was", " big", " in"]),
    ])
    rows, errors = inputs.parse_pairs_text(text, "jsonl")
    assert [(r.line, r.ending_b) for r in rows] == [(1, " in"), (4, " large")]
    assert [e.line for e in errors] == [3, 5, 6, 7]
    assert "invalid JSON" in errors[0].reason
    assert "missing field 'ending_b'" in errors[1].reason
    assert "must be a string" in errors[2].reason
    assert "expected an object" in errors[3].reason


def test_csv_rows_and_errors(tmp_path):
    text = ('context,ending_a,ending_b\n"The house was"," big"," in"\n'
            '"multi\nline context"," a"," b"\nonly,two\n\n"It is",red, small\n')
    path = tmp_path / "p.csv"
    path.write_text(text)
    rows, errors = inputs.read_pairs_file(str(path))
    assert [(r.line, r.context, r.ending_a) for r in rows] == [
        (2, "The house was", " big"), (3, "multi\nline context", " a"), (7, "It is", "red")]
    assert [(e.line, "expected 3 fields" in e.reason) for e in errors] == [(5, True)]
    bad_header = inputs.parse_pairs_text("ctx,a,b\nx,y,z\n", "csv")
    assert bad_header[0] == [] and "missing ['context']" in bad_header[1][0].reason
    with pytest.raises(ValueError, match="unknown extension"):
        inputs.detect_format("pairs.txt")


def test_encode_rows_reports_and_never_alters(tiny_model):
    rows = [inputs.PairRow("The house was", " big", " in", 1),
            inputs.PairRow("The house was", "big", " in", 2),          # no leading space
            inputs.PairRow("The house was", " big", " big", 3),        # identical
            inputs.PairRow("", " big", " in", 4)]
    good, errors = inputs.encode_rows(tiny_model.tokenizer, rows, tiny_model.config.n_positions)
    assert [l for l, _ in good] == [1]
    assert good[0][1].ending_a == " big"
    assert [e.line for e in errors] == [2, 3, 4]
    assert "leading-space" in errors[0].reason and "identical" in errors[1].reason


def test_duplicate_rows_are_reported_not_counted_twice(tiny_model):
    """Issue 10, defect 6: a repeated pair (also when written differently but tokenising the
    same) is an error naming the first line, and is used once."""
    rows, _ = inputs.parse_pairs_text("\n".join(json.dumps(r) for r in [
        {"context": "The house was", "ending_a": " big", "ending_b": " in"},
        {"context": "The house was", "ending_a": " big", "ending_b": " large"},
        {"context": "The house was", "a": " big", "b": " in"},          # line 3 = line 1
        {"context": "The house was", "ending_a": " in", "ending_b": " big"},  # reversed: another pair
    ]), "jsonl")
    good, errors = inputs.encode_rows(tiny_model.tokenizer, rows, tiny_model.config.n_positions)
    assert [l for l, _ in good] == [1, 2, 4]
    assert [(e.line, e.reason.split(" (")[0]) for e in errors] == [(3, "duplicate of line 1")]


def test_topk_pairs(tiny_model):
    rows, skipped = inputs.topk_pairs(tiny_model, "The house was", k=5)
    ctx = tiny_model.tokenizer("The house was", add_special_tokens=False)["input_ids"]
    logits, _ = pj.forward(tiny_model, np.asarray(ctx)[None])
    top5 = list(np.argsort(-np.asarray(logits[0, -1]), kind="stable")[:5])
    good, errors = inputs.encode_rows(tiny_model.tokenizer, rows, 64)
    assert not errors and len(rows) + len(skipped) == 10
    for _, p in good:
        assert p.token_a in top5 and p.token_b in top5
        assert top5.index(p.token_a) < top5.index(p.token_b)
    rows1, _ = inputs.topk_pairs(tiny_model, "The house was", k=5, pairs="top1")
    assert all(r.ending_a == rows1[0].ending_a for r in rows1)


def test_random_pairs(tiny_model):
    words = ["big", "in", "large", "red", "small", "qqqzzzxxx"]  # the last is not one token
    rows, skipped = inputs.random_pairs(tiny_model, ["The house was", "The car was"], 12, seed=3,
                                        words=words)
    again, _ = inputs.random_pairs(tiny_model, ["The house was", "The car was"], 12, seed=3,
                                   words=words)
    assert rows == again and len(rows) == 12
    assert len({(r.context, r.ending_a, r.ending_b) for r in rows}) == 12  # no pair drawn twice
    assert {r.context for r in rows} == {"The house was", "The car was"}
    assert all(r.ending_a != r.ending_b and r.ending_a.strip() in words[:5] for r in rows)
    assert skipped and all("qqqzzzxxx" in c for c, _ in skipped)
    vocab_rows, _ = inputs.random_pairs(tiny_model, ["The house was"], 5, seed=0)
    good, errors = inputs.encode_rows(tiny_model.tokenizer, vocab_rows, 64)
    assert len(good) == 5 and not errors


def test_text_pairs(tiny_model):
    text = "The house was big . The cat sat on the mat . The sky is blue ."
    rows, skipped = inputs.text_pairs(tiny_model, text, max_context=12, min_context=2)
    assert rows
    ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    good, errors = inputs.encode_rows(tiny_model.tokenizer, rows, 64)
    assert not errors
    for _, p in good[:3]:
        n = len(p.context_ids)
        assert list(p.context_ids) == ids[:n] and p.token_a == ids[n]  # A = actual next token
        logits, _ = pj.forward(tiny_model, np.asarray(ids[:13])[None])
        order = list(np.argsort(-np.asarray(logits[0, n - 1]), kind="stable"))
        assert p.token_b == (order[0] if order[0] != ids[n] else order[1])


def test_padded_context_length_stays_within_n_positions():
    from types import SimpleNamespace

    from plateau_jax.sweep.runner import context_length
    pairs = [(0, SimpleNamespace(context_ids=list(range(97))))]
    assert context_length(pairs) == 104
    assert context_length(pairs, n_positions=100) == 100
