"""Every figure of every script, rendered from small synthetic results (no model, no JAX): a title
that names the model, nothing clipped, integer ticks on layer axes and layer colour bars, no
``1.14x10^0`` tick labels on narrow log ranges, tick labels that do not overlap
(tests/figure_checks.py). One test per figure module, parametrised over its figures."""

import json

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from figure_checks import problems
from plateau_jax.plotting import directions, emergence, jacobians, plateaus, slices, style, sweep

MODEL = "synthetic-model"
RNG = np.random.default_rng(0)
N_STEPS = 12
ALPHA = np.linspace(0.0, 1.0, N_STEPS)


def _sigmoid(k, centre=0.5, x=ALPHA):
    y = 1.0 / (1.0 + np.exp(-k * (x - centre)))
    return (y - y[0]) / (y[-1] - y[0])


def _check(fig):
    assert fig is not None
    found = problems(fig, MODEL)
    assert not found, "\n".join(found)


# ----------------------------------------------------------------------------- plateaus

@pytest.fixture(scope="module")
def plateau_results(tmp_path_factory):
    """A results.npz of experiments.plateaus: 2 pairs, a 4-layer model, 12 steps (written and
    read back as the script does)."""
    P, n_layer, interp, dists = 2, 4, np.array([0, 1, 2]), np.array([1, 3])
    r_layers = np.stack([[_sigmoid(1 + 4 * l, 0.45 + 0.05 * p) for l in range(n_layer)]
                         for p in range(P)])
    r_layers[:, 0] = np.nan  # layer 0 is the interpolation layer
    steps = np.abs(np.diff(r_layers, axis=-1)) + 0.01
    res = dict(
        model_name=np.array(MODEL), context=np.array("The house was"), site=np.array("resid_post"),
        interp_path=np.array("slerp"), freeze_mode=np.array("mean"), layer=np.array(0),
        alpha=ALPHA, endings=np.array([[" big", " in"], [" big", " large"]]),
        r_resid_post=r_layers, r_logits=np.stack([_sigmoid(12), _sigmoid(3)]),
        interp_layers=interp, each_r_logits=RNG.uniform(size=(P, 3, N_STEPS)).cumsum(-1) / 6,
        distances=dists, dist_r_resid_post=np.stack([[[_sigmoid(2 + d + l) for l in interp]
                                                      for d in dists]] * P),
        freeze_conditions=np.array(["none", "attn", "mlp"]),
        frozen_r_logits=np.stack([[_sigmoid(k) for k in (12, 9, 1)]] * P),
        step_resid_post=steps, spline_density=RNG.poisson(3.0, steps.shape).astype(float),
        kl_logits=np.stack([[ALPHA ** 2, (1 - ALPHA) ** 2]] * P),
        sharpness_r_resid_post=np.array([[np.nan, 1.2, 1.5, 2.5], [np.nan, 1.1, 1.2, 1.3]]),
        boundary_resid_post=np.array([[np.nan, 0.5, 0.48, 0.45], [np.nan, 0.5, 0.5, 0.52]]),
        each_sharpness_r_logits=np.array([[2.5, 2.0, 1.5], [1.3, 1.2, 1.1]]),
        each_boundary_logits=np.array([[0.45, 0.47, 0.5], [0.5, 0.5, 0.5]]))
    path = tmp_path_factory.mktemp("plateaus") / "results.npz"
    np.savez(path, **res)
    return plateaus.load_results(str(path))


@pytest.mark.parametrize("name", plateaus.FIGURES)
def test_plateau_figures(plateau_results, name):
    _check(plateaus.BUILDERS[name](plateau_results))


def test_each_figure_is_written_under_its_name(tmp_path):
    """save_all writes FIGURES under their names (other tests and the README use them); a
    builder that returns None (no arrays for it) writes nothing."""
    for module in (plateaus, directions, slices, jacobians, emergence, sweep):
        assert tuple(module.BUILDERS) == module.FIGURES, module.__name__
    fig, _ = style.figure()
    paths = style.save_figures({"a": lambda x: fig, "b": lambda x: None}, str(tmp_path), 1,
                               suffix="_big-in", fmt="svg")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a_big-in.svg"]
    assert (tmp_path / "a_big-in.svg").read_text().startswith("<?xml")


def test_same_layer_same_colour_in_every_figure(plateau_results):
    """Layer 2's curves have one colour in the per-layer and the per-interpolation-layer
    figures, and that colour is layer 2's band of each figure's colour bar."""
    want = tuple(np.round(style.layer_color(2, 4), 6))
    for name in ("downstream_layers", "each_interp_layer", "step_sizes"):
        fig = plateaus.BUILDERS[name](plateau_results)
        colours = {tuple(np.round(to_rgba(line.get_color()), 6)) for line in fig.axes[0].get_lines()}
        assert want in colours, name
        cb = fig.axes[-1]._colorbar
        assert tuple(np.round(cb.cmap(cb.norm(2)), 6)) == want, name


# ----------------------------------------------------------------------------- jacobians

@pytest.fixture(scope="module")
def jacobian_results(tmp_path_factory):
    """A jacobians_A-B.npz: 3 later layers of a 4-layer model; the cumulative norms span a
    narrow range (13.9 .. 14.2, the case that used to print 1.4x10^1)."""
    layers = np.array([1, 2, 3])
    bump = np.exp(-((ALPHA - 0.45) / 0.1) ** 2)
    fam = lambda scale: np.stack([scale * (1 + l * bump) for l in layers]).astype(np.float32)
    res = dict(alpha=ALPHA, layers=layers, x=RNG.normal(size=(N_STEPS, 8)).astype(np.float32),
               mlp_fro=fam(1.0), attn_fro=fam(0.3), layer_fro=fam(13.9),
               product_mlp_fro=np.stack([10.0 ** -l * (1 + bump) for l in layers]),
               product_attn_fro=np.stack([10.0 ** -(2 * l) * (1 + bump) for l in layers]),
               cumulative_fro=13.9 + 0.1 * np.stack([l * bump for l in layers]),
               r_logits=_sigmoid(10), r_resid_post=np.stack([_sigmoid(2 * l) for l in layers]))
    path = tmp_path_factory.mktemp("jac") / "jacobians_big-in.npz"
    np.savez(path, **res)
    with np.load(path) as z:
        return dict(z)


@pytest.mark.parametrize("name", jacobians.FIGURES)
def test_jacobian_figures(jacobian_results, name):
    _check(jacobians.BUILDERS[name](jacobian_results, model_name=MODEL, endings=(" big", " in"),
                                    where="blocks.0.hook_resid_post"))


def test_jacobian_figures_skip_what_the_run_did_not_compute(jacobian_results, tmp_path):
    only_mlp = {k: v for k, v in jacobian_results.items()
                if not k.startswith(("product", "cumulative", "attn", "layer_"))}
    paths = jacobians.save_all(only_mlp, str(tmp_path), label="big-in", model_name=MODEL)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["jac_layers_big-in.png"]


# ----------------------------------------------------------------------------- emergence

@pytest.fixture(scope="module")
def emergence_results(tmp_path_factory):
    """A results.json of experiments.emergence: 4 checkpoints, 3 pairs, 2 later layers."""
    def q(v):
        return dict(median=float(np.median(v)), q1=float(np.percentile(v, 25)),
                    q3=float(np.percentile(v, 75)), mean=float(np.mean(v)), n=len(v))

    ckpts, summary = [], []
    for j, step in enumerate((0, 100, 1000, 5000)):
        pairs = []
        for p in range(3):
            r = _sigmoid(1 + 3 * j + p)
            jac = {i: dict(norms=(1 + 0.2 * i * np.exp(-((ALPHA - 0.5) / 0.2) ** 2)).tolist(),
                           peak_alpha=0.5, peak_offset=0.05 * p, contrast=1.1 + 0.1 * j)
                   for i in (1, 2)}
            pairs.append(dict(label=f"The house was |big->in{p}", r=r.tolist(), S=1.0 + j + p,
                              boundary_alpha=0.5, jacobian=jac, mean_peak_offset=0.05 * p,
                              mean_contrast=1.1 + 0.1 * j))
        ckpts.append(dict(step=step, directory=f"ckpt/step_{step}", revision=None, pairs=pairs))
        summary.append(dict(step=step, revision=None,
                            S=q([p["S"] for p in pairs]), boundary_alpha=q([0.45, 0.5, 0.55]),
                            mean_peak_offset=q([p["mean_peak_offset"] for p in pairs]),
                            mean_contrast=q([1.1 + 0.1 * j] * 3)))
    res = dict(alpha=ALPHA.tolist(), layer=0, path="slerp", checkpoints=ckpts, summary=summary,
               chance_peak_offset=0.33)
    path = tmp_path_factory.mktemp("emergence") / "results.json"
    path.write_text(json.dumps(res))  # string layer keys, as the script's file has them
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", emergence.FIGURES)
def test_emergence_figures(emergence_results, name):
    _check(emergence.BUILDERS[name](emergence_results, model_name=MODEL))


# ----------------------------------------------------------------------------- sweep report

def _sweep_table(n_layer=2, layers=(0, 1), n_pairs=6):
    """A report table (as plateau_jax.sweep.report.load_table returns) of a 2-layer model: the
    narrow sharpness range 1.06 .. 1.14 and the short layer axis of issue 12's figure."""
    from plateau_jax.sweep import report
    from plateau_jax.sweep.stats import STAT_NAMES

    rows = []
    for L in layers:
        for p in range(n_pairs):
            for t in range(L + 1, n_layer + 1):
                rows.append((p, L, t))
    pair, L, t = (np.array(c) for c in zip(*rows))
    n = len(rows)
    table = {s: RNG.uniform(0.3, 0.7, n) for s in STAT_NAMES}
    for s in ("S_r_grid", "S_r_ref", "S_d_grid", "S_d_ref"):
        table[s] = 1.06 + 0.08 * RNG.uniform(size=n)
    table["plateau"] = (RNG.uniform(size=n) > 0.5).astype(float)
    labels = [str(i) for i in range(n_layer)] + ["logits"]
    table.update(pair_index=pair, line=pair, ok=np.ones(n, bool), interp_layer=L,
                 target_index=t, target=np.array([labels[i] for i in t], dtype=object),
                 depth=np.where(t < n_layer, t - L, -1))
    table["_manifest"] = dict(config_hash="0" * 12, config=dict(
        spec=dict(n_steps=N_STEPS, layers=list(layers)), pairs=dict(n=n_pairs),
        model=dict(name=MODEL, config=dict(n_layer=n_layer))))
    table["_shards"] = 1
    return table, report.summarize(table)


@pytest.mark.parametrize("name", sweep.FIGURES)
def test_sweep_report_figures(name):
    table, rows = _sweep_table()
    _check(sweep.BUILDERS[name](table, rows, model_name=MODEL, n_layer=2))


@pytest.mark.parametrize("name", sweep.FIGURES)
def test_sweep_report_figures_without_successful_pairs(name):
    table, rows = _sweep_table()
    table["ok"][:] = False
    _check(sweep.BUILDERS[name](table, rows, model_name=MODEL, n_layer=2))


# ----------------------------------------------------------------------------- directions

@pytest.fixture(scope="module")
def direction_results():
    names = ["real", "random", "matched", "cov_diff", "mixture", "sensitive"]
    B, per, L = 5, 3, 9
    lengths = np.linspace(0, 2, L)
    types = np.repeat(names, per)
    kl = np.stack([np.outer(np.ones(3), lengths ** (1 + i)) for i in range(len(names))])
    thr = RNG.uniform(0.2, 1.8, (B, len(types)))
    thr[0, 0] = np.inf
    return dict(model_name=MODEL, layer=1, site="resid_pre", lengths=lengths, kl_threshold=0.5,
                type_names=np.array(names), types=types, threshold=thr,
                summary_kl_q25=kl[:, 0] * 0.8, summary_kl_median=kl[:, 1],
                summary_kl_q75=kl[:, 2] * 1.2,
                sharpness=RNG.uniform(1, 5, (B, len(types), 2)),
                sensitive_trace=np.cumsum(RNG.uniform(size=(B, 2, 30)), -1),
                sensitive_objective_name="kl", sensitive_length=0.5)


@pytest.mark.parametrize("name", directions.FIGURES)
def test_direction_figures(direction_results, name):
    _check(directions.BUILDERS[name](direction_results))


# ----------------------------------------------------------------------------- slices

@pytest.fixture(scope="module")
def slice_results():
    s, t = np.linspace(-0.5, 1.6, 20), np.linspace(-0.5, 0.9, 16)
    S, T = np.meshgrid(s, t, indexing="ij")
    anchors = np.array([[0.0, 0.0], [1.15, 0.0], [0.1, 0.4]])
    d = np.stack([np.hypot(S - x, T - y) for x, y in anchors])
    return dict(model_name=MODEL, layer=1, site="resid_pre", s=s, t=t, anchor_coords=anchors,
                anchor_labels=np.array([" big", " in", " large"]), top=np.argmin(d, 0) + 7,
                token_strings=np.array([" the", ".", " genus"]), kl=d ** 2,
                rel_distance=d[0] / (d[0] + d[1]))


@pytest.mark.parametrize("name", slices.FIGURES)
def test_slice_figures(slice_results, name):
    _check(slices.BUILDERS[name](slice_results))


# ----------------------------------------------------------------------------- the checks fail

def test_the_checks_catch_each_defect():
    """What issue 12 saw in the old sharpness_by_depth: no title, ticks at layer 1.25,
    1.14x10^0 labels, a y label off the figure."""
    fig, axes = style.figure(1, 1, width=3.0, height=2.5)
    ax = axes[0, 0]
    ax.plot([1, 2], [1.06, 1.14])
    ax.set_yscale("log")  # matplotlib's own log labels
    ax.set_xlabel("recording layer")
    ax.set_ylabel("sharpness (median, IQR of refined shaded), a label too long to fit")
    fig.set_layout_engine("none")
    found = "\n".join(problems(fig, MODEL))
    for what in ("no figure title", "layer axis 'recording layer' has ticks at",
                 "times10", "is clipped"):
        assert what in found, (what, found)
    style.title(fig, "Sharpness", "another-model")
    assert "does not name the model" in "\n".join(problems(fig, MODEL))


def test_plain_log_labels_on_narrow_ranges():
    fig, axes = style.figure(1, 2)
    for ax, (lo, hi) in zip(axes[0], ((1.06, 1.14), (1e-4, 1.0))):
        ax.plot([0, 1], [lo, hi])
        style.log_axis(ax, "y")
    fig.canvas.draw()
    narrow = [t.get_text() for t in axes[0, 0].get_yticklabels(minor=True)
              + axes[0, 0].get_yticklabels() if t.get_text()]
    assert narrow and all(float(x) for x in narrow)  # plain numbers: '1.08', '1.1', ...
    wide = [t.get_text() for t in axes[0, 1].get_yticklabels() if t.get_text()]
    assert any("10^{-" in w for w in wide)  # decades stay powers of ten
