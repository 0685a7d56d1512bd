"""Figures of a Jacobian sweep, one set per prompt pair, drawn from the arrays of
``jacobians_{A}-{B}.npz`` (``python -m experiments.jacobians``; the README lists the arrays).

* ``jac_layers``: per-layer Jacobian norms (MLP, attention, whole layer) along the path;
* ``jac_products``: the study's skip-free products of MLP / attention Jacobians (log scale);
* ``jac_cumulative``: the end-to-end cumulative Jacobian ``d resid_post[l] / d x`` (log scale);
* ``jac_cumulative_depth``: the cumulative norms and resid_post's relative distance as maps over
  (alpha, depth).

Curves are coloured by layer (:func:`plateau_jax.plotting.style.layer_color`); the dashed black
curve (right axis) is the logits' relative distance r(alpha) when the run recorded it. A figure
whose arrays the run did not compute is skipped.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib import colors as mcolors

from plateau_jax.plotting import style

FIGURES = ("jac_layers", "jac_products", "jac_cumulative", "jac_cumulative_depth")
STAT_NAMES = {"fro": "Frobenius norm", "spec": "spectral norm",
              "fro_hutch": "Frobenius norm (Hutchinson estimate)"}
PANEL_TITLES = {
    "mlp": "MLP: d mlp_out / d MLP input",
    "attn": "attention: d attn_out / d resid_pre",
    "layer": "whole layer: d resid_post / d resid_pre",
    "product_mlp": "product of MLP Jacobians",
    "product_attn": "product of attention Jacobians",
    "cumulative": "cumulative: d resid_post[l] / d x",
}


def stat_key(res, name: str):
    """``(array name, stat)`` of family ``name``'s norms in ``res`` (Frobenius first), or
    ``(None, None)`` when the run did not compute them."""
    for stat in STAT_NAMES:
        if f"{name}_{stat}" in res:
            return f"{name}_{stat}", stat
    return None, None


def _n_layer(res) -> int:
    return int(np.max(res["layers"])) + 1  # the rows run to the model's last layer


def _title(fig, what: str, model_name: str, endings, where: str):
    return style.title(fig, what, model_name,
                       f"pair {style.pair_name(endings)}" if endings is not None else "",
                       f"interpolation at {where}" if where else "")


def _overlay_r(ax, res) -> None:
    """The logits' r(alpha) on a right-hand axis (dashed black), when recorded."""
    if "r_logits" not in res:
        return
    ax2 = ax.twinx()
    ax2.plot(res["alpha"], res["r_logits"], "k--", lw=1.2)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("r (logits), dashed")


def _norm_panels(res, names: Sequence[str], log: bool):
    """One panel per family of ``names`` present in ``res``: norms against alpha, one curve per
    layer; ``None`` when none is present."""
    names = [n for n in names if stat_key(res, n)[0]]
    if not names:
        return None
    n_layer, layers = _n_layer(res), res["layers"]
    fig, axes = style.figure(1, len(names), width=4.6, height=3.6)
    for ax, name in zip(axes[0], names):
        key, stat = stat_key(res, name)
        for i, layer in enumerate(layers):
            ax.plot(res["alpha"], res[key][i], color=style.layer_color(layer, n_layer), lw=1.2)
        if log:
            style.log_axis(ax, "y")
        style.alpha_axis(ax)
        ax.set(title=PANEL_TITLES[name], ylabel=STAT_NAMES[stat])
    style.layer_colorbar(fig, axes, layers, n_layer,
                         "product up to layer" if names[0].startswith("product") else "layer")
    for ax in axes[0]:
        _overlay_r(ax, res)
    return fig


def fig_layers(res, *, model_name: str, endings=None, where: str = ""):
    """Per-layer Jacobian norms (MLP, attention, whole layer) against alpha."""
    fig = _norm_panels(res, ("mlp", "attn", "layer"), log=False)
    return fig and _title(fig, "Per-layer Jacobian norms along the path", model_name, endings, where)


def fig_products(res, *, model_name: str, endings=None, where: str = ""):
    """The study's products ``J_l ... J_first`` of MLP / attention Jacobians (log scale)."""
    fig = _norm_panels(res, ("product_mlp", "product_attn"), log=True)
    return fig and _title(fig, "The study's products of per-layer Jacobians (skip path left out: "
                               "not end-to-end derivatives)", model_name, endings, where)


def fig_cumulative(res, *, model_name: str, endings=None, where: str = ""):
    """End-to-end cumulative Jacobian norms, one curve per depth (log scale)."""
    fig = _norm_panels(res, ("cumulative",), log=True)
    return fig and _title(fig, "Cumulative Jacobian norms by depth", model_name, endings, where)


def fig_cumulative_depth(res, *, model_name: str, endings=None, where: str = ""):
    """Maps over (alpha, depth): the cumulative Jacobian's norm next to resid_post's relative
    distance r; ``None`` without either."""
    key, stat = stat_key(res, "cumulative")
    if not key or "r_resid_post" not in res:
        return None
    alpha, layers = res["alpha"], res["layers"]
    extent = (alpha[0], alpha[-1], layers[0] - 0.5, layers[-1] + 0.5)
    fig, axes = style.figure(1, 2, width=4.8, height=3.6)
    norms = np.asarray(res[key], np.float64)
    im = axes[0, 0].imshow(norms, aspect="auto", origin="lower", extent=extent,
                           norm=mcolors.LogNorm(np.nanmin(norms), np.nanmax(norms)), cmap="magma")
    cb = fig.colorbar(im, ax=axes[0, 0], label=f"{STAT_NAMES[stat]} (log colour scale)")
    style.log_axis(cb.ax, "y")
    axes[0, 0].set(title="cumulative Jacobian d resid_post[l] / d x", ylabel="layer l")
    im = axes[0, 1].imshow(res["r_resid_post"], aspect="auto", origin="lower", vmin=0, vmax=1,
                           extent=extent, cmap="magma")
    fig.colorbar(im, ax=axes[0, 1], label="relative distance r")
    axes[0, 1].set(title="relative distance r of resid_post[l]", ylabel="layer l")
    for ax in axes[0]:
        style.alpha_axis(ax)
        style.integer_axis(ax, "y")
    return _title(fig, "Sensitivity and response by depth", model_name, endings, where)


BUILDERS = {"jac_layers": fig_layers, "jac_products": fig_products,
            "jac_cumulative": fig_cumulative, "jac_cumulative_depth": fig_cumulative_depth}


def save_all(res: Dict[str, np.ndarray], output_dir: str, *, label: str, model_name: str,
             endings=None, where: str = "", fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Draws every figure of :data:`FIGURES` that ``res`` has the arrays for and writes each
    as ``{output_dir}/{name}_{label}.{fmt}``; returns the paths. Titles name ``model_name``,
    the pair's ``endings`` (A, B) and ``where`` the path was interpolated."""
    return style.save_figures(BUILDERS, output_dir, res, fmt=fmt, dpi=dpi, suffix=f"_{label}",
                              model_name=model_name, endings=endings, where=where)
