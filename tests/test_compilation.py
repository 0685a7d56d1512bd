"""Compilation: the number of programs a study run or a Jacobian sweep compiles does not grow with
depth; the persistent cache serves a second run; matmul precision names are checked."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import plateau_jax as pj
from plateau_jax import testing
from plateau_jax.compilation import CompileCounter, enable_compilation_cache
from plateau_jax.jacobians import sweep as jac
from plateau_jax.plateaus import paths, prompts

from conftest import CONTEXT


def _model(n_layer, d_model, tokenizer):
    cfg = testing.tiny_config(n_layer=n_layer, d_model=d_model, d_mlp=2 * d_model)
    return testing.make_checkpoint(None, cfg, seed=0, tokenizer=tokenizer)


def _study(model):
    from experiments import plateaus as study

    pairs = prompts.encode_pairs(model.tokenizer, CONTEXT, [(" big", " in"), (" big", " large")],
                                 model.config.n_positions)
    L = model.config.n_layer
    with CompileCounter() as counter:
        study.run_study(model, pairs, paths.alpha_grid(7), layer=0, interp_layers=list(range(L)),
                        site="resid_post", path="slerp", freeze_mode="mean",
                        freeze_layers=list(range(1, L)), distances=[1, 4])
    return counter.count


def _jacobians(model):
    ctx = model.to_tokens(CONTEXT)
    cache = pj.run_prefix(model, ctx)
    x = np.random.default_rng(0).normal(size=(5, model.config.d_model)).astype(np.float32)
    with CompileCounter() as counter:
        for layer in range(model.config.n_layer - 1):
            jac.jacobian_sweep(model, cache, x, layer, families=("mlp", "attn", "layer"),
                               products=True, cumulative=True)
    return counter.count


@pytest.mark.slow
@pytest.mark.parametrize("run", [_study, _jacobians], ids=["study", "jacobian_sweep"])
def test_program_count_does_not_grow_with_depth(tiny_tokenizer, run):
    # A warm-up compiles the programs whose shapes depend on neither depth nor width (alpha
    # grids, ...); the two measured runs have different widths as well as depths, so that no
    # program of one serves the other. A program another test compiled would count for one run
    # and not the other: the in-memory caches are cleared, and the widths are ones no other test
    # uses (nor can the persistent cache, which the sweep tests turn on, hold them).
    import jax
    jax.clear_caches()
    run(_model(3, 24, tiny_tokenizer))
    shallow, deep = run(_model(2, 40, tiny_tokenizer)), run(_model(6, 56, tiny_tokenizer))
    assert shallow == deep, (shallow, deep)
    assert deep <= 40


def test_matmul_precision_names_are_checked(tiny_model):
    with pytest.raises(ValueError, match="matmul_precision='fast'.*highest"):
        tiny_model.with_precision("fast")
    with pytest.raises(ValueError, match="matmul_precision"):
        pj.init_model(testing.tiny_config(), matmul_precision="tf32")
    assert tiny_model.with_precision("tensorfloat32").matmul_precision == "tensorfloat32"
    assert tiny_model.matmul_precision == "highest"


def test_unwritable_cache_warns_and_runs_without(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert enable_compilation_cache(str(blocker / "cache")) is None
    assert "running without it" in caplog.text
    assert enable_compilation_cache("") is None


@pytest.mark.slow
def test_second_run_reads_every_program_from_the_persistent_cache(tmp_path):
    cache = tmp_path / "xla"
    run = lambda out: subprocess.run(
        [sys.executable, "-m", "experiments.plateaus", f"--output_dir={tmp_path / out}",
         "--steps=5", "--interp_layers=0,1", f"--compilation_cache={cache}"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first = run("a")
    assert first.returncode == 0, first.stderr[-2000:]
    entries = set(os.listdir(cache))
    assert len(entries) >= 4  # the continuation, prefix, ... programs
    second = run("b")
    assert second.returncode == 0, second.stderr[-2000:]
    assert set(os.listdir(cache)) == entries  # nothing new compiled: every program was a hit
