"""The study's figures, drawn from the arrays of a plateau results file (see the README).

Every function takes plain arrays (or the loaded ``.npz`` as a dict) and returns a matplotlib
figure; :func:`save_all` writes the whole set. Conventions (:mod:`plateau_jax.plotting.style`):
x axis = alpha (0 = endpoint A, 1 = endpoint B, the endpoint tokens are marked on the top axis);
colour = layer (the same colour for the same layer in every figure), with a discrete colour bar;
one panel per prompt pair; where pairs share a panel, colour = pair and line style = condition.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from plateau_jax.plotting import style

FIGURES = ("downstream_layers", "each_interp_layer", "layers_between", "freezing",
           "step_sizes", "spline_density", "summary")


def _n_layer(res) -> int:
    return int(res["r_resid_post"].shape[1])


def _title(fig, res, what: str, interp: bool = True):
    """Title: ``what``, the model, and where the path runs (interpolation layer, site, path)."""
    where = (f"interpolation at layer {int(res['layer'])} ({res['site']})" if interp
             else f"interpolation at {res['site']}")
    return style.title(fig, what, str(res["model_name"]), f"context {str(res['context'])!r}",
                       f"{where}, {res['interp_path']} path")


def curves_by_layer(ax, x, curves, layers: Sequence[int], n_layer: int) -> List[int]:
    """Draws ``curves`` ``[len(layers), len(x)]`` in each layer's colour (NaN rows are
    skipped); returns the layers drawn."""
    drawn = []
    for layer, y in zip(layers, curves):
        if np.all(np.isnan(y)):
            continue
        ax.plot(x, y, color=style.layer_color(layer, n_layer), lw=1.2)
        drawn.append(int(layer))
    return drawn


def layer_figure(x, curves, layers, endings, *, n_layer: int, ylabel: str, cbar_label: str,
                 logits=None, xlabel: str = style.ALPHA_LABEL):
    """One panel per pair: ``curves`` ``[P, len(layers), len(x)]`` coloured by layer with a
    colour bar, optionally the logits curve ``[P, len(x)]`` in black. ``endings`` ``[P, 2]``.
    The caller sets the title (:func:`plateau_jax.plotting.style.title`)."""
    P = curves.shape[0]
    fig, axes = style.figure(1, P, width=5.0, height=3.6)
    drawn = set()
    for i, ax in enumerate(axes[0]):
        drawn.update(curves_by_layer(ax, x, curves[i], layers, n_layer))
        if logits is not None:
            ax.plot(x, logits[i], color="k", ls="--", lw=1.5, label="logits")
            ax.legend(loc="upper left")
        style.alpha_axis(ax, endings[i], label=xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(style.pair_name(endings[i]))
    style.layer_colorbar(fig, axes, sorted(drawn) or list(layers), n_layer, cbar_label)
    return fig


def _mid(alpha):
    return 0.5 * (alpha[1:] + alpha[:-1])


def fig_downstream_layers(res):
    n_layer = _n_layer(res)
    fig = layer_figure(res["alpha"], res["r_resid_post"], range(n_layer), res["endings"],
                       n_layer=n_layer, ylabel="relative distance r (resid_post)",
                       cbar_label="recording layer", logits=res["r_logits"])
    return _title(fig, res, "Relative distance r of resid_post in every later layer")


def fig_each_interp_layer(res):
    fig = layer_figure(res["alpha"], res["each_r_logits"], res["interp_layers"], res["endings"],
                       n_layer=_n_layer(res), ylabel="relative distance r (logits)",
                       cbar_label="interpolation layer")
    return _title(fig, res, "Relative distance r of the logits, interpolating at each layer",
                  interp=False)


def fig_layers_between(res):
    """Rows = pairs, columns = N layers between interpolation and recording (resid_post)."""
    r, dists, L = res["dist_r_resid_post"], res["distances"], res["interp_layers"]
    n_layer = _n_layer(res)
    P, D = r.shape[:2]
    fig, axes = style.figure(P, D, width=3.4, height=3.0)
    drawn = set()
    for i in range(P):
        for j in range(D):
            ax = axes[i, j]
            drawn.update(curves_by_layer(ax, res["alpha"], r[i, j], L, n_layer))
            style.alpha_axis(ax, res["endings"][i],
                             label=style.ALPHA_LABEL if i == P - 1 else None)
            if j == 0:
                ax.set_ylabel(f"{style.pair_name(res['endings'][i])}\nr (resid_post)")
            ax.set_title(f"N = {int(dists[j])} layer{'s' if dists[j] > 1 else ''} later")
    style.layer_colorbar(fig, axes, sorted(drawn) or list(L), n_layer, "interpolation layer")
    return _title(fig, res, "Relative distance r of resid_post N layers after the "
                            "interpolation layer", interp=False)


def _freezing_curves(ax, res, i, label_pair: bool) -> None:
    """Pair ``i``'s logits r under each freezing condition: the pair's colour, the condition's
    line style."""
    for c, cond in enumerate(str(c) for c in res["freeze_conditions"]):
        label = style.CONDITION_LABELS[cond]
        ax.plot(res["alpha"], res["frozen_r_logits"][i, c], color=style.pair_color(i),
                ls=style.CONDITION_LINESTYLES[cond], lw=1.6,
                label=f"{style.pair_name(res['endings'][i])}, {label}" if label_pair else label)


def fig_freezing(res):
    P = res["frozen_r_logits"].shape[0]
    fig, axes = style.figure(1, P, width=5.0, height=3.6)
    for i, ax in enumerate(axes[0]):
        _freezing_curves(ax, res, i, label_pair=False)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, label="straight line")
        style.alpha_axis(ax, res["endings"][i])
        ax.set_ylabel("relative distance r (logits)")
        ax.set_title(style.pair_name(res["endings"][i]))
        ax.legend(loc="upper left")
    return _title(fig, res, f"Freezing every later attn_out or mlp_out at its "
                            f"{res['freeze_mode']} value: r of the logits")


def fig_step_sizes(res):
    s = res["step_resid_post"]
    frac = s / np.sum(s, axis=-1, keepdims=True)
    fig = layer_figure(_mid(res["alpha"]), frac, range(s.shape[1]), res["endings"],
                       n_layer=_n_layer(res), ylabel="step size / path length",
                       cbar_label="recording layer")
    return _title(fig, res, r"Step sizes $\|y(\alpha_{k+1}) - y(\alpha_k)\|$ of resid_post, "
                            "as a fraction of the path length")


def fig_spline_density(res):
    h = res["spline_density"]
    fig = layer_figure(_mid(res["alpha"]), h, range(h.shape[1]), res["endings"],
                       n_layer=_n_layer(res), ylabel="spline density\n(flips / |Δ MLP input|)",
                       cbar_label="layer")
    return _title(fig, res, "Spline density: MLP neurons changing sign per unit of path "
                            "length in the MLP's input")


def fig_summary(res):
    """One page: per-layer curves (first pair), logits r, freezing, KL, sharpness, boundary."""
    alpha, endings = res["alpha"], res["endings"]
    P, n_layer = res["r_resid_post"].shape[:2]
    fig, axes = style.figure(2, 3, width=5.0, height=4.0)
    names = [style.pair_name(e) for e in endings]

    ax = axes[0, 0]
    drawn = curves_by_layer(ax, alpha, res["r_resid_post"][0], range(n_layer), n_layer)
    ax.plot(alpha, res["r_logits"][0], "k--", lw=1.5, label="logits")
    ax.set(title=f"r in every later layer, {names[0]}", ylabel="r (resid_post)")
    ax.legend(loc="upper left")
    style.alpha_axis(ax, endings[0])
    style.layer_colorbar(fig, ax, drawn or [0], n_layer, "recording layer")

    ax = axes[0, 1]
    for i in range(P):
        ax.plot(alpha, res["r_logits"][i], color=style.pair_color(i), label=names[i])
    ax.set(title="r of the logits", ylabel="r (logits)")
    ax.legend(loc="upper left")
    style.alpha_axis(ax, ("A", "B"))

    ax = axes[0, 2]
    for i in range(P):
        _freezing_curves(ax, res, i, label_pair=True)
    ax.set(title=f"freezing (frozen value: {res['freeze_mode']})", ylabel="r (logits)")
    style.key_legend(ax, style.pair_colors(names), [(style.CONDITION_LABELS[str(c)],
                                   style.CONDITION_LINESTYLES[str(c)], None)
                                  for c in res["freeze_conditions"]])
    style.alpha_axis(ax, ("A", "B"))

    ax = axes[1, 0]
    for i in range(P):
        ax.plot(alpha, res["kl_logits"][i, 0], color=style.pair_color(i))
        ax.plot(alpha, res["kl_logits"][i, 1], color=style.pair_color(i), ls="--")
    ax.set(title="next-token KL to the endpoints", ylabel="KL (nats)")
    style.key_legend(ax, style.pair_colors(names), [("KL(A‖α)", "-", None), ("KL(B‖α)", "--", None)])
    style.alpha_axis(ax, ("A", "B"))

    layers = np.arange(n_layer)
    kinds = [(f"resid_post, interpolation at {int(res['layer'])}: x = recording layer", "-", "o"),
             ("logits: x = interpolation layer", "--", "s")]
    for ax, key, ylabel in ((axes[1, 1], "sharpness_r", r"sharpness $S_r$ (on r)"),
                            (axes[1, 2], "boundary", r"boundary $\alpha^*$ (on r)")):
        for i in range(P):
            ax.plot(layers, res[f"{key}_resid_post"][i], "o-", ms=3, color=style.pair_color(i))
            ax.plot(res["interp_layers"], res[f"each_{key}_logits"][i], "s--", ms=3,
                    color=style.pair_color(i), alpha=0.6)
        ax.set(xlabel="layer", ylabel=ylabel, title=ylabel)
        style.integer_axis(ax, "x")
    style.key_legend(fig, style.pair_colors(names), kinds, loc="outside lower right",
                     ncols=len(names) + len(kinds))
    axes[1, 1].axhline(1.0, color="0.6", lw=0.8)
    axes[1, 2].set_ylim(0, 1)
    return _title(fig, res, "Activation plateaus: summary")


BUILDERS = {"downstream_layers": fig_downstream_layers, "each_interp_layer": fig_each_interp_layer,
            "layers_between": fig_layers_between, "freezing": fig_freezing,
            "step_sizes": fig_step_sizes, "spline_density": fig_spline_density,
            "summary": fig_summary}


def save_all(res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Draws every figure of :data:`FIGURES` from a results dict and saves each atomically as
    ``{output_dir}/{name}.{fmt}``; returns the paths."""
    return style.save_figures(BUILDERS, output_dir, res, fmt=fmt, dpi=dpi)


def load_results(path: str) -> Dict[str, np.ndarray]:
    """The arrays of a results ``.npz`` as a dict (0-d string arrays become ``str``)."""
    with np.load(path) as f:
        return {k: (str(v) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in f.items()}
