"""experiments.plateaus end to end on a tiny local checkpoint, its flagfile and its errors."""

import json
import os
import stat

import jax
import numpy as np
import pytest
from absl import flags

import plateau_jax
from experiments import common, plateaus
from plateau_jax.plateaus import metrics
from plateau_jax.plateaus import interpolation
from plateau_jax.plotting import plateaus as plotting

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


def test_end_to_end_writes_every_promised_file(tmp_path, plateau_dir, plateau_model):
    root = tmp_path / "run"
    _run(f"--model={plateau_dir}", f"--output_dir={root}", "--steps=6",
         "--distances=1,2,24", "--freeze_mode=linear")
    out = root / "plateaus"
    assert out.is_symlink()  # published: a link to the one version directory
    for name in ["config.json", "results.npz"] + [f + ".png" for f in plotting.FIGURES]:
        assert (out / name).stat().st_size > 0, name
    assert sorted(os.listdir(root)) == sorted([".plateaus.lock", "plateaus", os.readlink(out)])
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["pairs"] == "big:in,big:large" and cfg["config"]["steps"] == 6
    assert "jax" in cfg["versions"] and cfg["devices"] and cfg["model_config"]["n_layer"] == 3

    res = plotting.load_results(str(out / "results.npz"))
    P, n, L = 2, 6, 3
    d, d_mlp, V = 32, 48, 400
    shapes = {"alpha": (n,), "tokens": (P, 2), "endings": (P, 2), "x": (P, n, d),
              "endpoints": (P, 2, d), "r_resid_post": (P, L, n), "r_mlp_pre": (P, L, n),
              "r_logits": (P, n), "kl_logits": (P, 2, n), "step_resid_post": (P, L, n - 1),
              "spline_density": (P, L, n - 1), "sharpness_r_resid_post": (P, L),
              "sharpness_d_resid_post": (P, L), "sharpness_r_logits": (P,),
              "sharpness_d_logits": (P,), "boundary_logits": (P,), "frozen_r_logits": (P, 3, n),
              "frozen_r_resid_post": (P, 3, L, n), "interp_layers": (L,), "distances": (2,),
              "each_r_logits": (P, L, n), "each_sharpness_r_logits": (P, L),
              "dist_r_resid_post": (P, 2, L, n)}
    for k, shape in shapes.items():
        assert res[k].shape == shape, k
    np.testing.assert_array_equal(res["distances"], [1, 2])  # 24 clipped to the depth
    assert np.all(np.isnan(res["r_resid_post"][:, 0])) and not np.any(np.isnan(res["r_resid_post"][:, 1:]))
    np.testing.assert_array_equal(res["r_logits"][:, [0, -1]], [[0, 1], [0, 1]])
    np.testing.assert_allclose(res["each_r_logits"][:, 0], res["r_logits"])
    np.testing.assert_allclose(res["frozen_r_logits"][:, 0], res["r_logits"])
    # Interpolating at layer 1, by hand: logits and N = 1 (layer 2's resid_post) must match.
    model = plateau_model
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
    # S on r and S on d(alpha)/d(1), from the main run's logits recomputed by hand.
    ends0 = np.asarray(interpolation.endpoint_activations(model, prefix, res["tokens"].ravel(), [0]))[0]
    ends0 = ends0.reshape(P, 2, d)
    run0 = interpolation.interpolation_run(model, prefix, ends0[:, 0], ends0[:, 1], 0, res["alpha"],
                                           components=("resid_post",))
    lg = np.asarray(run0.logits, np.float64)
    np.testing.assert_allclose(res["sharpness_r_logits"],
                               metrics.sharpness(metrics.relative_distance(lg), res["alpha"]), rtol=1e-5)
    np.testing.assert_allclose(res["sharpness_d_logits"],
                               metrics.sharpness(metrics.distance_curve(lg), res["alpha"]), rtol=1e-5)
    assert np.all(np.abs(res["sharpness_d_logits"] - res["sharpness_r_logits"]) > 1e-6)
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
    (["--layer=2"], "--layer=2 with --site=resid_post leaves no later layer"),  # issue 10, 5
    (["--alphas=0,nan,1"], "alpha grid must be finite"),                         # issue 10, 6
    (["--alphas=0,inf,1"], "alpha grid must be finite"),
    (["--pairs=big:in,big:in"], "given twice"),                                  # issue 10, 6
    (["--distances=0"], "--distances=0: expected positive integers"),
])
def test_bad_input_gives_a_clear_error_and_no_results(tmp_path, args, message, plateau_dir):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _run(f"--model={plateau_dir}", f"--output_dir={out}", *args)
    assert message in str(e.value.code)
    assert not (out / "plateaus").exists()


def test_unknown_path_or_freeze_mode_is_refused_by_the_flags():
    for bad in ("--path=cubic", "--freeze_mode=first"):
        FLAGS.unparse_flags()
        with pytest.raises(flags.IllegalFlagValueError, match="should be one of"):
            FLAGS(["plateaus", "--output_dir=x", bad])


def test_unwritable_output_dir(tmp_path, plateau_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
        target = "/proc/plateau-out"
    else:
        target = str(locked / "out")
    with pytest.raises(SystemExit) as e:
        _run(f"--model={plateau_dir}", f"--output_dir={target}")
    assert "cannot be written" in str(e.value.code)


@pytest.mark.slow
def test_nan_stops_the_run_naming_step_and_layer(tmp_path, plateau_model):
    model = plateau_model
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
    assert not (out / "plateaus").exists()


# ----------------------------------------------------------------------------- issue 10

def _published(root):
    """(config, results) of the run published in root/plateaus, checked for consistency."""
    out = root / "plateaus"
    cfg = json.loads((out / "config.json").read_text())["config"]
    res = plotting.load_results(str(out / "results.npz"))
    assert res["alpha"].size == cfg["steps"]
    assert sorted(os.listdir(out)) == sorted(["config.json", "results.npz"]
                                             + [f + "." + cfg["figure_format"] for f in plotting.FIGURES])
    return cfg, res


@pytest.mark.slow
def test_other_configuration_is_refused_before_any_work(tmp_path, monkeypatch, plateau_dir):
    root = tmp_path / "run"
    base = [f"--model={plateau_dir}", f"--output_dir={root}", "--interp_layers=0",
            "--distances=1"]
    _run(*base, "--steps=4")
    before = {f: (root / "plateaus" / f).read_bytes() for f in os.listdir(root / "plateaus")}
    loaded = []
    monkeypatch.setattr(plateaus.common, "load_model_from_flags", lambda: loaded.append(1))
    with pytest.raises(SystemExit) as e:
        _run(*base, "--steps=5")
    assert "another configuration (steps: 4 (on disk) vs 5 (now))" in str(e.value.code)
    assert "--overwrite" in str(e.value.code) and not loaded  # refused before loading the model
    assert {f: (root / "plateaus" / f).read_bytes() for f in os.listdir(root / "plateaus")} == before


@pytest.mark.slow
def test_ctrl_c_leaves_the_previous_complete_run(tmp_path, monkeypatch, capsys, plateau_dir):
    """Issue 10, defect 1: --steps=7 published, reruns with --steps=9 --overwrite interrupted by
    SIGINT during compute, between results and figures (plotting), and just before publication
    each leave the 7-step run; an uninterrupted rerun replaces it. (SIGKILL: slow tests in
    test_fault_injection.py.)"""
    root = tmp_path / "run"
    base = [f"--model={plateau_dir}", f"--output_dir={root}", "--interp_layers=0",
            "--distances=1"]
    _run(*base, "--steps=7")
    version = os.readlink(root / "plateaus")
    for point in ("compute", "write", "before-publish"):
        monkeypatch.setenv("PLATEAU_JAX_TEST_INTERRUPT", f"{point}:SIGINT")
        with pytest.raises(SystemExit) as e:
            _run(*base, "--steps=9", "--overwrite", "--figure_format=svg")
        assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
        cfg, res = _published(root)
        assert cfg["steps"] == 7 and res["alpha"].size == 7, point
        assert os.readlink(root / "plateaus") == version
        assert sorted(os.listdir(root)) == sorted([".plateaus.lock", "plateaus", version])
    monkeypatch.delenv("PLATEAU_JAX_TEST_INTERRUPT")
    _run(*base, "--steps=9", "--overwrite", "--figure_format=svg")
    cfg, res = _published(root)
    assert cfg["steps"] == 9 and res["alpha"].size == 9
    assert sorted(os.listdir(root)) == sorted([".plateaus.lock", "plateaus",
                                               os.readlink(root / "plateaus")])  # old version gone


def test_tilde_in_output_dir_and_model_is_expanded(tmp_path, monkeypatch):
    """Issue 10, defect 6: ~ in --model / --output_dir means the home directory (the flags are
    expanded before anything else; the run stops at the bad --steps before any work)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--steps"):
        _run("--model=~/tiny", "--output_dir=~/outdir", "--steps=1")
    assert FLAGS.output_dir == str(home / "outdir") and FLAGS.model == str(home / "tiny")
    assert not (tmp_path / "~").exists()
    assert common.script_config("experiments.plateaus")["output_dir"] == str(home / "outdir")


@pytest.mark.slow
def test_float16_overflow_is_named_and_float32_suggested(tmp_path, plateau_model):
    """Issue 10, defect 9: endpoints that overflow float16 are not blamed on the path."""
    model = plateau_model
    params = jax.tree_util.tree_map(lambda a: a, model.params)
    w = np.array(params["blocks"]["mlp"]["W_out"])
    w[0] = np.sign(w[0]) * 6e4  # finite in float16, but layer 0's mlp_out sums 48 such terms:
    params["blocks"]["mlp"]["W_out"] = w  # |resid_post| >> 65504
    big = model.replace(params=params)
    prefix = plateau_jax.run_prefix(big, big.to_tokens("The house was"))
    toks = [int(big.to_tokens("The house was big")[-1]), int(big.to_tokens("The house was in")[-1])]
    ends32 = np.asarray(interpolation.endpoint_activations(big, prefix, toks, [0]))[0]
    assert np.isfinite(ends32).all()  # fine in float32
    half = big.astype("float16")
    prefix16 = plateau_jax.run_prefix(half, half.to_tokens("The house was"))
    ends = np.asarray(interpolation.endpoint_activations(half, prefix16, toks, [0]), np.float32)[0]
    assert not np.isfinite(ends).all()
    for path in ("slerp", "linear"):
        with pytest.raises(interpolation.NonFiniteError) as e:
            interpolation.interpolation_run(half, prefix16, ends[0], ends[1], 0, np.linspace(0, 1, 5),
                                            path=path)
        msg = str(e.value)
        assert "float16 overflows above 65504" in msg and "--dtype=float32" in msg
        assert "antiparallel" not in msg and "linear" not in msg
