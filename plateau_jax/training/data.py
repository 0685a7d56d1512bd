"""Training text for the project's own small GPT-2: corpus discovery, splitting, tokenizer, batches.

Corpus: the glosses of WordNet 3.0 (definitions and example sentences of 117,659 synsets,
about 8.8 MB of modern English), shipped by Debian's ``wordnet-base`` package under the
WordNet 3.0 licence (permissive, BSD-like: use, copy, modify and distribute for any purpose,
keeping the copyright notice). ``apt-get install wordnet-base`` puts it in /usr/share/wordnet;
NLTK's WordNet copy (``nltk_data/corpora/wordnet``) has the same files and works too.

Each synset becomes one short document, e.g.::

    house: a dwelling that serves as living quarters for one or more families. He has a house
    on Cape Cod. She felt she had to get out of the house.

Documents are split into train / held-out by a hash of their synset id (stable across
machines), joined with ``<|endoftext|>`` into one token stream per split.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

EOT = "<|endoftext|>"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
CORPUS_ENV = "PLATEAU_JAX_CORPUS_DIR"
DEFAULT_CORPUS_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet",
                       "~/nltk_data/corpora/wordnet", "/usr/share/nltk_data/corpora/wordnet",
                       "/usr/local/share/nltk_data/corpora/wordnet")
CORPUS_LICENCE = "WordNet 3.0 licence (Princeton University; permissive, BSD-like)"


class CorpusNotFoundError(FileNotFoundError):
    """The training corpus is not installed where we look."""


def find_corpus(corpus_dir: Optional[str] = None) -> str:
    """Directory holding WordNet's ``data.{noun,verb,adj,adv}``: ``corpus_dir``, else
    ``$PLATEAU_JAX_CORPUS_DIR``, else the usual Debian / NLTK locations. Raises
    :class:`CorpusNotFoundError` saying how to install it."""
    if corpus_dir:
        candidates = [corpus_dir]
    elif os.environ.get(CORPUS_ENV):
        candidates = [os.environ[CORPUS_ENV]]
    else:
        candidates = list(DEFAULT_CORPUS_DIRS)
    for c in candidates:
        c = os.path.expanduser(c)
        if all(os.path.isfile(os.path.join(c, f)) for f in WORDNET_FILES):
            return c
    raise CorpusNotFoundError(
        "The training corpus (WordNet 3.0 glosses) was not found in "
        f"{', '.join(candidates)}: each needs {', '.join(WORDNET_FILES)}. Install it with "
        "`apt-get install wordnet-base` (Debian/Ubuntu; files go to /usr/share/wordnet), or "
        "point --corpus_dir (or $PLATEAU_JAX_CORPUS_DIR) at a directory holding WordNet 3.0's "
        "data files (e.g. nltk_data/corpora/wordnet).")


def _sentence(text: str) -> str:
    text = text.strip().strip(";").strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def parse_gloss_line(line: str) -> Optional[Tuple[str, str]]:
    """One line of a WordNet ``data.*`` file -> (synset key, document text), or None for the
    licence header lines."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    offset, pos = fields[0], fields[2]
    n_words = int(fields[3], 16)
    words = [re.sub(r"\(.*?\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
    examples = re.findall(r'"([^"]*)"', gloss)
    definition = re.sub(r'"[^"]*"', "", gloss)
    definition = re.sub(r"(;\s*)+", "; ", definition).strip().strip(";").strip()
    parts = [f"{', '.join(words)}: {definition}" if definition else ", ".join(words) + ":"]
    text = parts[0].rstrip(".") + "."
    for ex in examples:
        s = _sentence(ex)
        if s:
            text += " " + s
    return f"{pos}{offset}", text


def load_documents(corpus_dir: Optional[str] = None) -> List[Tuple[str, str]]:
    """Every synset of the corpus as (key, text), in file order."""
    directory = find_corpus(corpus_dir)
    docs = []
    for name in WORDNET_FILES:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                d = parse_gloss_line(line)
                if d is not None:
                    docs.append(d)
    return docs


def is_heldout(key: str, heldout_per_mille: int = 20) -> bool:
    """Deterministic split: a document is held out when crc32(key) mod 1000 < per-mille."""
    return zlib.crc32(key.encode()) % 1000 < heldout_per_mille


def split_documents(docs: Sequence[Tuple[str, str]], heldout_per_mille: int = 20,
                    seed: int = 0) -> Tuple[List[str], List[str]]:
    """(train texts, held-out texts); each list shuffled with ``seed`` so parts of speech mix."""
    train = [t for k, t in docs if not is_heldout(k, heldout_per_mille)]
    held = [t for k, t in docs if is_heldout(k, heldout_per_mille)]
    rng = np.random.default_rng(seed)
    return [train[i] for i in rng.permutation(len(train))], [held[i] for i in rng.permutation(len(held))]


def train_tokenizer(texts: Sequence[str], directory: str, vocab_size: int = 4096,
                    min_frequency: int = 2):
    """Trains a byte-level BPE (``tokenizers``) on ``texts`` and saves it in GPT-2's file
    format (vocab.json, merges.txt, tokenizer_config.json) in ``directory``; returns it loaded
    with ``AutoTokenizer`` (which is how the loader reads it back)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    os.makedirs(directory, exist_ok=True)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOT], show_progress=False)
    bpe.save_model(directory)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT,
                   "unk_token": EOT, "add_prefix_space": False, "model_max_length": 1024}, f)
    return load_tokenizer(directory)


def load_tokenizer(directory: str):
    import warnings

    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(directory)


def encode_stream(tokenizer, texts: Sequence[str], chunk: int = 4096) -> np.ndarray:
    """Token ids of ``texts`` joined by ``<|endoftext|>`` (one before each document), int32."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    out = []
    for i in range(0, len(texts), chunk):
        for ids in tokenizer(list(texts[i:i + chunk]), add_special_tokens=False)["input_ids"]:
            out.append(eot)
            out.extend(ids)
    return np.asarray(out, np.int32)


def random_windows(stream: np.ndarray, batch_size: int, length: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``[batch, length + 1]`` windows at random offsets (inputs are [:, :-1], targets [:, 1:])."""
    starts = rng.integers(0, len(stream) - length - 1, size=batch_size)
    return np.stack([stream[s:s + length + 1] for s in starts])


def eval_windows(stream: np.ndarray, length: int, max_windows: Optional[int] = None) -> np.ndarray:
    """Consecutive non-overlapping ``[n, length + 1]`` windows (each window's first token is
    context only), the first ``max_windows`` of them."""
    n = (len(stream) - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one window "
                         f"of {length + 1}.")
    return np.stack([stream[i * length:i * length + length + 1] for i in range(n)])


def unigram_loss(train_stream: np.ndarray, eval_targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_targets`` under the train stream's unigram
    distribution (add-one smoothed): the loss of a model that ignores context."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(eval_targets).ravel()].mean())


def iter_batches(stream: np.ndarray, batch_size: int, length: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        yield random_windows(stream, batch_size, length, rng)


WORDNET_LICENSE = """WordNet 3.0 license (the training corpus of this model: WordNet 3.0's glosses)

This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""


def heldout_sample(heldout_texts: Sequence[str], max_chars: int = 30000) -> List[str]:
    """The first held-out documents (in split order) up to ``max_chars`` characters in all."""
    out, n = [], 0
    for t in heldout_texts:
        t = t.replace("\n", " ")
        if n + len(t) + 1 > max_chars:
            break
        out.append(t)
        n += len(t) + 1
    return out
