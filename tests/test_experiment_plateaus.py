"""experiments.plateaus end to end on a tiny local checkpoint, its flagfile and its errors."""

import json
import os
import stat

import jax
import numpy as np
import pytest
from absl import flags

import plateau_jax
from experiments import plateaus
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import interpolation
from plateau_jax.plotting import plateaus as plotting
from plateau_fixtures import tiny_checkpoint_dir, tiny_model

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    FLAGS.unparse_flags()
    FLAGS(["plateaus", *args])
    plateaus.main(["plateaus"])


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PLATEAU_JAX_NO_PROGRESS", "1")
    yield
    FLAGS.unparse_flags()


def test_end_to_end_writes_every_promised_file(tmp_path):
    out = tmp_path / "run"
    _run(f"--model={tiny_checkpoint_dir()}", f"--output_dir={out}", "--steps=6",
         "--distances=1,2,24", "--freeze_mode=linear")
    for name in ["config.json", "results.npz"] + [f + ".png" for f in plotting.FIGURES]:
        assert (out / name).stat().st_size > 0, name
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["pairs"] == "big:in,big:large" and cfg["config"]["steps"] == 6
    assert "jax" in cfg["versions"] and cfg["devices"]

    res = plotting.load_results(str(out / "results.npz"))
    P, n, L = 2, 6, 3
    d, d_mlp, V = 32, 48, 400
    shapes = {"alpha": (n,), "tokens": (P, 2), "endings": (P, 2), "x": (P, n, d),
              "endpoints": (P, 2, d), "r_resid_post": (P, L, n), "r_mlp_pre": (P, L, n),
              "r_logits": (P, n), "kl_logits": (P, 2, n), "step_resid_post": (P, L, n - 1),
              "spline_density": (P, L, n - 1), "sharpness_resid_post": (P, L),
              "boundary_logits": (P,), "frozen_r_logits": (P, 3, n),
              "frozen_r_resid_post": (P, 3, L, n), "interp_layers": (L,), "distances": (2,),
              "each_r_logits": (P, L, n), "each_sharpness_logits": (P, L),
              "dist_r_resid_post": (P, 2, L, n)}
    for k, shape in shapes.items():
        assert res[k].shape == shape, k
    np.testing.assert_array_equal(res["distances"], [1, 2])  # 24 clipped to the depth
    assert np.all(np.isnan(res["r_resid_post"][:, 0])) and not np.any(np.isnan(res["r_resid_post"][:, 1:]))
    np.testing.assert_array_equal(res["r_logits"][:, [0, -1]], [[0, 1], [0, 1]])
    np.testing.assert_allclose(res["each_r_logits"][:, 0], res["r_logits"])
    np.testing.assert_allclose(res["frozen_r_logits"][:, 0], res["r_logits"])
    # Interpolating at layer 1, by hand: logits and N = 1 (layer 2's resid_post) must match.
    model = tiny_model()
    prefix = plateau_jax.run_prefix(model, res["context_ids"])
    ends = np.asarray(interpolation.endpoint_activations(model, prefix, res["tokens"].ravel(), [1]))[0]
    ends = ends.reshape(P, 2, d)
    run = interpolation.interpolation_run(model, prefix, ends[:, 0], ends[:, 1], 1, res["alpha"],
                                    components=("resid_post",), layers=[2])
    np.testing.assert_allclose(res["each_r_logits"][:, 1], metrics.relative_distance(run.logits),
                               atol=1e-6)
    np.testing.assert_allclose(res["dist_r_resid_post"][:, 0, 1],
                               metrics.relative_distance(run.act("resid_post", 2)), atol=1e-6)
    np.testing.assert_allclose(res["dist_r_resid_post"][:, 0, 0], res["r_resid_post"][:, 1])
    assert np.all(np.isnan(res["dist_r_resid_post"][:, 1, 1:]))  # N = 2 from layer 1 or 2: beyond
    assert not np.any(np.isnan(res["dist_r_resid_post"][:, 1, 0]))
    # Freezing changes the curves (its semantics are tested in test_plateau.py).
    assert np.abs(res["frozen_r_logits"][:, 1:] - res["r_logits"][:, None]).max() > 1e-4


def test_study_flagfile_reproduces_the_study_configuration():
    FLAGS.unparse_flags()
    FLAGS(["plateaus", f"--flagfile={ROOT}/experiments/flags/study.flags", "--output_dir=x"])
    assert FLAGS.model == "gpt2-large" and FLAGS.center_writing_weights
    assert FLAGS.context == "The house was" and FLAGS.pairs == "big:in,big:large"
    assert (FLAGS.steps, FLAGS.path, FLAGS.layer, FLAGS.site, FLAGS.freeze_mode) == (
        50, "slerp", 0, "resid_post", "mean")


@pytest.mark.parametrize("args,message", [
    (["--pairs=big:elephant"], "tokenises as"),
    (["--pairs=big:big"], "identical"),
    (["--context= "], "context is empty"),
    (["--context=" + "The house was " * 30], "Shorten the context"),
    (["--steps=1"], "at least 2 steps"),
    (["--alphas=0,0.7,0.5,1"], "alpha grid"),
    (["--layer=3"], "--layer=3 is out of range"),
    (["--interp_layers=0,7"], "--interp_layers"),
    (["--freeze_layers=0"], "--freeze_layers"),
])
def test_bad_input_gives_a_clear_error_and_no_results(tmp_path, args, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _run(f"--model={tiny_checkpoint_dir()}", f"--output_dir={out}", *args)
    assert message in str(e.value.code)
    assert not (out / "results.npz").exists()


def test_unknown_path_or_freeze_mode_is_refused_by_the_flags():
    for bad in ("--path=cubic", "--freeze_mode=first"):
        FLAGS.unparse_flags()
        with pytest.raises(flags.IllegalFlagValueError, match="should be one of"):
            FLAGS(["plateaus", "--output_dir=x", bad])


def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
        target = "/proc/plateau-out"
    else:
        target = str(locked / "out")
    with pytest.raises(SystemExit) as e:
        _run(f"--model={tiny_checkpoint_dir()}", f"--output_dir={target}")
    assert "cannot be written" in str(e.value.code)


def test_nan_stops_the_run_naming_step_and_layer(tmp_path):
    model = tiny_model()
    params = jax.tree_util.tree_map(lambda a: a, model.params)
    # finite float16 weights whose layer-1 MLP output overflows float16
    params["blocks"]["mlp"]["b_in"] = params["blocks"]["mlp"]["b_in"].at[1, 0].set(6e4)
    params["blocks"]["mlp"]["W_out"] = params["blocks"]["mlp"]["W_out"].at[1, 0].set(10.0)
    bad_dir = tmp_path / "nan-model"
    plateau_jax.save_gpt2(model.replace(params=params), str(bad_dir))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _run(f"--model={bad_dir}", f"--output_dir={out}", "--steps=4", "--interp_layers=0",
             "--dtype=float16")
    assert "NaN/Inf at step 0" in str(e.value.code) and "layer 1" in str(e.value.code)
    assert not (out / "results.npz").exists()
