"""Set-up shared by the benchmarks: a model (random of a preset size, or a checkpoint), its
checkpoint directory for the PyTorch reference, a context and an interpolation path."""

from __future__ import annotations

import argparse
import tempfile
from typing import Optional

import numpy as np

# "The house was" and " big" / " in" in GPT-2's vocabulary (the study's prompt).
STUDY_CONTEXT = (464, 2156, 373)
STUDY_TOKENS = (1263, 287)


def add_model_flags(parser: argparse.ArgumentParser, size: str = "gpt2") -> argparse.ArgumentParser:
    parser.add_argument("--model", default="",
                        help="checkpoint directory (default: random weights of --size)")
    parser.add_argument("--size", default=size,
                        help="preset of the random model: gpt2, gpt2-medium, gpt2-large, ...")
    parser.add_argument("--n_layer", type=int, default=0,
                        help="override the preset's depth (0: keep)")
    return parser


def model_config(args) -> dict:
    """What the JSON record says about the model."""
    return {"model": args.model or f"random {args.size}", "n_layer_override": args.n_layer or None}


def load(args, need_dir: bool):
    """(model, checkpoint directory or None). A random model is written to a temp directory only
    when ``need_dir`` (the PyTorch reference loads from there)."""
    import plateau_jax as pj

    if args.model:
        model = pj.load_model(args.model, require_tokenizer=False,
                              matmul_precision=args.matmul_precision)
        return model, args.model
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    cfg = pj.ModelConfig.preset(args.size, **overrides)
    model = pj.init_model(cfg, seed=0, matmul_precision=args.matmul_precision)
    directory = None
    if need_dir:
        directory = tempfile.mkdtemp(prefix="plateau_bench_")
        pj.save_model(model, directory)
    return model, directory


def context_and_tokens(config, n_ctx: int = 0, seed: int = 0):
    """The study's context and endings for GPT-2's vocabulary, else random ids; ``n_ctx`` > 0:
    a random context of that length."""
    rng = np.random.default_rng(seed)
    if not n_ctx and config.vocab_size >= 50257:
        return np.array(STUDY_CONTEXT, np.int32), STUDY_TOKENS
    ctx = rng.integers(0, config.vocab_size, n_ctx or 3).astype(np.int32)
    toks = rng.integers(0, config.vocab_size, 2)
    return ctx, (int(toks[0]), int(toks[1]))


def path(model, prefix, tokens, n_steps: int, layer: int = 0, site: str = "resid_pre"):
    """The slerp path ``[n_steps, d]`` between two endings' ``blocks.{layer}.hook_{site}``."""
    import plateau_jax as pj
    from plateau_jax.plateaus import paths

    e = pj.embed_next_token(model, prefix, np.asarray(tokens, np.int32))
    if (layer, site) != (0, "resid_pre"):
        s = pj.site_name(layer, site)
        _, rec = pj.continue_from(model, prefix, e, 0, site="resid_pre", sites=[s])
        e = rec[s]
    return paths.interpolate(np.asarray(e[0]), np.asarray(e[1]), paths.alpha_grid(n_steps))


def default_batch_size(batch_size: int) -> int:
    """``--batch_size=0``: 2 steps per chunk on CPU (a [2 d, m] operand stays in cache: measured
    fastest), 10 on accelerators."""
    if batch_size:
        return batch_size
    import jax

    return 2 if jax.devices()[0].platform == "cpu" else 10


def cleanup(directory: Optional[str], args) -> None:
    if directory and not args.model and directory.startswith(tempfile.gettempdir()):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
