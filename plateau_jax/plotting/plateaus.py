"""The study's figures, drawn from the arrays of a plateau results file (see the README).

Every function takes plain arrays (or the loaded ``.npz`` as a dict) and returns a matplotlib
figure; :func:`save_all` writes the whole set. Conventions: x axis = alpha (0 = endpoint A,
1 = endpoint B, the endpoint tokens are marked on the top axis); colour = layer, with a colour
bar; one panel per prompt pair.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plateau_jax import files  # noqa: E402

CMAP = "viridis"
FIGURES = ("downstream_layers", "each_interp_layer", "layers_between", "freezing",
           "step_sizes", "spline_density", "summary")


def _pair(endings) -> str:
    return f"{str(endings[0])!r} → {str(endings[1])!r}"


def mark_endpoints(ax, token_a: str, token_b: str) -> None:
    """Labels alpha = 0 and 1 on a top axis with the endpoint tokens (A and B)."""
    top = ax.secondary_xaxis("top")
    top.set_xticks([0.0, 1.0], labels=[f"A: {str(token_a)!r}", f"B: {str(token_b)!r}"])
    top.tick_params(length=4, labelsize=8)
    for x in (0.0, 1.0):
        ax.axvline(x, color="0.8", lw=0.8, zorder=0)


def _panels(n: int, width: float = 4.2, height: float = 3.4, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False,
                             constrained_layout=True)
    return fig, axes


def _colorbar(fig, axes, norm, label: str):
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=CMAP)
    cb = fig.colorbar(sm, ax=np.ravel(axes).tolist(), label=label)
    cb.locator = matplotlib.ticker.MaxNLocator(integer=True)
    cb.update_ticks()
    return cb


def _layer_norm(layers):
    layers = list(layers) or [0]
    return matplotlib.colors.Normalize(min(layers), max(max(layers), min(layers) + 1))


def curves_by_layer(ax, x, curves, layers: Sequence[int], norm) -> None:
    """Draws ``curves`` ``[len(layers), len(x)]`` coloured by layer (NaN rows are skipped)."""
    cmap = matplotlib.colormaps[CMAP]
    for layer, y in zip(layers, curves):
        if np.all(np.isnan(y)):
            continue
        ax.plot(x, y, color=cmap(norm(layer)), lw=1.2)


def layer_figure(x, curves, layers, endings, *, ylabel: str, title: str, cbar_label: str,
                 logits=None, xlabel: str = r"interpolation $\alpha$"):
    """One panel per pair: ``curves`` ``[P, n_layers, len(x)]`` coloured by ``layers``,
    optionally the logits curve ``[P, len(x)]`` in black. ``endings`` ``[P, 2]``."""
    P = curves.shape[0]
    fig, axes = _panels(P)
    norm = _layer_norm(layers)
    for i, ax in enumerate(axes[0]):
        curves_by_layer(ax, x, curves[i], layers, norm)
        if logits is not None:
            ax.plot(x, logits[i], color="k", ls="--", lw=1.5, label="logits")
            ax.legend(loc="upper left", fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1))
        ax.set_title(_pair(endings[i]), fontsize=10, pad=18)
        mark_endpoints(ax, *endings[i])
    fig.suptitle(title)
    _colorbar(fig, axes, norm, cbar_label)
    return fig


def _mid(alpha):
    return 0.5 * (alpha[1:] + alpha[:-1])


def fig_downstream_layers(res):
    return layer_figure(res["alpha"], res["r_resid_post"], range(res["r_resid_post"].shape[1]),
                        res["endings"], ylabel="relative distance r (resid_post)",
                        cbar_label="recording layer", logits=res["r_logits"],
                        title=f"Interpolating at layer {int(res['layer'])} "
                              f"({res['site']}): relative distance in each later layer")


def fig_each_interp_layer(res):
    return layer_figure(res["alpha"], res["each_r_logits"], res["interp_layers"], res["endings"],
                        ylabel="relative distance r (logits)", cbar_label="interpolation layer",
                        title="Interpolating at each layer, recording the logits")


def fig_layers_between(res):
    """Rows = pairs, columns = N layers between interpolation and recording (resid_post)."""
    r, dists, L = res["dist_r_resid_post"], res["distances"], res["interp_layers"]
    P, D = r.shape[:2]
    fig, axes = _panels(D, 3.4, 3.0, rows=P)
    norm = _layer_norm(L)
    for i in range(P):
        for j in range(D):
            ax = axes[i, j]
            curves_by_layer(ax, res["alpha"], r[i, j], L, norm)
            ax.set(xlim=(0, 1), xlabel=r"$\alpha$" if i == P - 1 else None,
                   ylabel=f"{_pair(res['endings'][i])}\nr (resid_post)" if j == 0 else None)
            ax.set_title(f"N = {int(dists[j])} layer{'s' if dists[j] > 1 else ''} downstream",
                         fontsize=9, pad=16)
            mark_endpoints(ax, *res["endings"][i])
    fig.suptitle("Recording N layers after the interpolation layer (resid_post)")
    _colorbar(fig, axes, norm, "interpolation layer")
    return fig


def fig_freezing(res):
    P = res["frozen_r_logits"].shape[0]
    fig, axes = _panels(P)
    styles = {"none": ("k", "-", "normal"), "attn": ("tab:blue", "--", "attention frozen"),
              "mlp": ("tab:red", ":", "MLP frozen")}
    for i, ax in enumerate(axes[0]):
        for c, cond in enumerate(res["freeze_conditions"]):
            color, ls, label = styles[str(cond)]
            ax.plot(res["alpha"], res["frozen_r_logits"][i, c], color=color, ls=ls, lw=1.6,
                    label=label)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, label="straight line")
        ax.set(xlabel=r"interpolation $\alpha$", ylabel="relative distance r (logits)", xlim=(0, 1))
        ax.set_title(_pair(res["endings"][i]), fontsize=10, pad=18)
        ax.legend(fontsize=8)
        mark_endpoints(ax, *res["endings"][i])
    fig.suptitle(f"Freezing every later layer's attn_out or mlp_out "
                 f"(mode: {res['freeze_mode']}; interpolation at layer {int(res['layer'])})")
    return fig


def fig_step_sizes(res):
    s = res["step_resid_post"]
    frac = s / np.sum(s, axis=-1, keepdims=True)
    return layer_figure(_mid(res["alpha"]), frac, range(s.shape[1]), res["endings"],
                        ylabel="step size / total path length", cbar_label="recording layer",
                        title=r"Step sizes $\|y(\alpha_{k+1}) - y(\alpha_k)\|$ of resid_post, per layer")


def fig_spline_density(res):
    h = res["spline_density"]
    return layer_figure(_mid(res["alpha"]), h, range(h.shape[1]), res["endings"],
                        ylabel="spline density (flips / |Δ resid_mid|)",
                        cbar_label="layer", title="Spline density per layer")


def fig_summary(res):
    """One page: per-layer curves (first pair), logits r, freezing, KL, sharpness, boundary."""
    alpha, endings = res["alpha"], res["endings"]
    P, n_layer = res["r_resid_post"].shape[:2]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    norm = _layer_norm(range(n_layer))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    pair = lambda i: _pair(endings[i])

    ax = axes[0, 0]
    curves_by_layer(ax, alpha, res["r_resid_post"][0], range(n_layer), norm)
    ax.plot(alpha, res["r_logits"][0], "k--", lw=1.5, label="logits")
    ax.set(title=f"r per layer, {pair(0)}", xlabel=r"$\alpha$", ylabel="r (resid_post)", xlim=(0, 1))
    ax.legend(fontsize=8)
    mark_endpoints(ax, *endings[0])
    _colorbar(fig, ax, norm, "layer")

    ax = axes[0, 1]
    for i in range(P):
        ax.plot(alpha, res["r_logits"][i], color=colors[i % len(colors)], label=pair(i))
    ax.set(title="logits r", xlabel=r"$\alpha$", ylabel="r (logits)", xlim=(0, 1))
    ax.legend(fontsize=8)
    mark_endpoints(ax, "A", "B")

    ax = axes[0, 2]
    for i in range(P):
        for c, (cond, ls) in enumerate(zip(res["freeze_conditions"], ("-", "--", ":"))):
            ax.plot(alpha, res["frozen_r_logits"][i, c], color=colors[i % len(colors)], ls=ls,
                    label=f"{pair(i)}, {'normal' if cond == 'none' else str(cond) + ' frozen'}")
    ax.set(title=f"freezing ({res['freeze_mode']})", xlabel=r"$\alpha$", ylabel="r (logits)",
           xlim=(0, 1))
    ax.legend(fontsize=7)
    mark_endpoints(ax, "A", "B")

    ax = axes[1, 0]
    for i in range(P):
        ax.plot(alpha, res["kl_logits"][i, 0], color=colors[i % len(colors)], label=f"{pair(i)}: KL(A‖α)")
        ax.plot(alpha, res["kl_logits"][i, 1], color=colors[i % len(colors)], ls="--",
                label=f"{pair(i)}: KL(B‖α)")
    ax.set(title="next-token KL to the endpoints", xlabel=r"$\alpha$", ylabel="KL (nats)", xlim=(0, 1))
    ax.legend(fontsize=7)
    mark_endpoints(ax, "A", "B")

    layers = np.arange(n_layer)
    for ax, key, ylabel in ((axes[1, 1], "sharpness_r", r"sharpness $S_r$ (on r)"),
                            (axes[1, 2], "boundary", r"boundary $\alpha^*$ (on r)")):
        for i in range(P):
            ax.plot(layers, res[f"{key}_resid_post"][i], "o-", ms=3, color=colors[i % len(colors)],
                    label=f"{pair(i)}, interp. at {int(res['layer'])}, vs recording layer")
            ax.plot(res["interp_layers"], res[f"each_{key}_logits"][i], "s--", ms=3,
                    color=colors[i % len(colors)], alpha=0.6,
                    label=f"{pair(i)}, logits, vs interpolation layer")
        ax.set(xlabel="layer", ylabel=ylabel, title=ylabel + " (resid_post / logits)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    axes[1, 1].axhline(1.0, color="0.6", lw=0.8)
    axes[1, 2].set_ylim(0, 1)
    fig.suptitle(f"Activation plateaus: {res['model_name']}, context {str(res['context'])!r}, "
                 f"{res['interp_path']} path, interpolation at layer {int(res['layer'])} ({res['site']})")
    return fig


_BUILDERS = {"downstream_layers": fig_downstream_layers, "each_interp_layer": fig_each_interp_layer,
             "layers_between": fig_layers_between, "freezing": fig_freezing,
             "step_sizes": fig_step_sizes, "spline_density": fig_spline_density,
             "summary": fig_summary}


def save_all(res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
             dpi: int = 120) -> List[str]:
    """Draws every figure of :data:`FIGURES` from a results dict and saves each atomically as
    ``{output_dir}/{name}.{fmt}``; returns the paths."""
    paths = []
    for name in FIGURES:
        fig = _BUILDERS[name](res)
        path = os.path.join(output_dir, f"{name}.{fmt}")
        files.atomic_savefig(fig, path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


def load_results(path: str) -> Dict[str, np.ndarray]:
    """The arrays of a results ``.npz`` as a dict (0-d string arrays become ``str``)."""
    with np.load(path) as f:
        return {k: (str(v) if v.dtype.kind == "U" and v.ndim == 0 else v) for k, v in f.items()}
