"""Figures of a sweep report (``DIR/report/`` of ``python -m experiments.sweep_report``), drawn
from the long table and the summary rows of :mod:`plateau_jax.sweep.report`
(:func:`~plateau_jax.sweep.report.load_table`, :func:`~plateau_jax.sweep.report.summarize`).

* ``sharpness_by_depth``: S_r (left) and S_d (right) medians by recording layer, one colour per
  interpolation layer L (:func:`plateau_jax.plotting.style.layer_color`); refined solid with
  its IQR shaded, grid dashed; log scale with plain tick labels;
* ``alpha_star_hist``: the logits' boundary alpha* over pairs, per L;
* ``jac_vs_boundary``: each (pair, layer)'s MLP Jacobian-norm peak against its boundary.

Panels without successful pairs say so.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from matplotlib import ticker

from plateau_jax.plotting import style

FIGURES = ("sharpness_by_depth", "alpha_star_hist", "jac_vs_boundary")
KIND_STYLES = {"ref": ("refined (IQR shaded)", "-", "o"), "grid": ("grid", "--", "o")}


def _title(fig, table, what: str, model_name: str):
    ok = np.asarray(table["ok"], bool)
    n = len(np.unique(np.asarray(table["pair_index"])[ok]))
    Ls = ", ".join(str(L) for L in sorted({int(L) for L in table["interp_layer"]}))
    return style.title(fig, what, model_name, f"{n} pair{'s' if n != 1 else ''}",
                       f"interpolation at resid_post of L = {Ls}")


def _layers(rows) -> List[int]:
    return sorted({int(r["interp_layer"]) for r in rows})


def _target_axis(ax, n_layer: int) -> None:
    """The recording-layer axis: integer ticks, the logits (index ``n_layer``) named."""
    style.integer_axis(ax, "x")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: "logits" if round(v) == n_layer else f"{v:.0f}"))
    ax.set_xlabel("recording layer")


def fig_sharpness_by_depth(table, rows, *, model_name: str, n_layer: int):
    """S_r and S_d medians by recording layer per interpolation layer L (refined: solid, IQR
    shaded; grid: dashed), log scale."""
    fig, axes = style.figure(1, 2, width=5.2, height=4.0, sharey=True)
    Ls = _layers(rows)
    for ax, curve in zip(axes[0], ("r", "d")):
        positive = False
        for L in Ls:
            rr = [r for r in rows if r["interp_layer"] == L]
            x = [n_layer if r["target"] == "logits" else int(r["target"]) for r in rr]
            color = style.layer_color(L, n_layer)
            for kind in ("ref", "grid"):
                key = f"S_{curve}_{kind}"
                med = np.array([r[f"{key}_median"] for r in rr], np.float64)
                positive |= bool(np.any(med[np.isfinite(med)] > 0))
                _, ls, marker = KIND_STYLES[kind]
                ax.plot(x, med, ls=ls, marker=marker, ms=4, color=color)
                if kind == "ref":
                    ax.fill_between(x, [r[f"{key}_q25"] for r in rr],
                                    [r[f"{key}_q75"] for r in rr], alpha=0.2, color=color, lw=0)
        _target_axis(ax, n_layer)
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        if positive:
            style.log_axis(ax, "y")
        else:
            style.no_data(ax, "no successful pairs")
        ax.set_title(f"$S_{curve}$: sharpness of "
                     + ("r (relative distance)" if curve == "r" else "d (distance curve)"))
    axes[0, 0].set_ylabel("sharpness, median over pairs")
    style.key_legend(axes[0, 1], [(f"L = {L}", style.layer_color(L, n_layer)) for L in Ls],
                     list(KIND_STYLES.values()), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     title="interpolation layer")
    return _title(fig, table, "Sharpness by recording layer (S = 1: a straight line)",
                  model_name)


def fig_alpha_star_hist(table, rows, *, model_name: str, n_layer: int):
    """Histogram over pairs of the logits' boundary alpha* (refined: solid, grid: dashed)."""
    fig, axes = style.figure(1, 1, width=6.0, height=4.0)
    ax = axes[0, 0]
    ok = np.asarray(table["ok"], bool)
    drawn = []
    for L in _layers(rows):
        m = ok & (table["interp_layer"] == L) & (table["target"] == "logits")
        color = style.layer_color(L, n_layer)
        for key, ls in (("alpha_ref", "-"), ("alpha_grid", "--")):
            v = table[key][m].astype(float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=50, range=(0, 1), histtype="step", color=color, ls=ls, lw=1.4)
                drawn.append(L)
    if drawn:
        style.key_legend(ax, [(f"L = {L}", style.layer_color(L, n_layer))
                              for L in sorted(set(drawn))],
                         [("refined", "-", None), ("grid", "--", None)], loc="upper left",
                         bbox_to_anchor=(1.02, 1.0), title="interpolation layer")
    else:
        style.no_data(ax, "no successful pairs")
    style.alpha_axis(ax, label=r"boundary $\alpha^*$ of the logits (located on r)")
    ax.set_ylabel("pairs")
    style.integer_axis(ax, "y")
    return _title(fig, table, "Where the logits' boundary lies", model_name)


def fig_jac_vs_boundary(table, rows, *, model_name: str, n_layer: int):
    """Each (pair, L, recording layer)'s MLP Jacobian-norm peak alpha against the boundary
    alpha* of the same recording, coloured by the depth (layers after L)."""
    fig, axes = style.figure(1, 1, width=5.6, height=4.6)
    ax = axes[0, 0]
    m = np.asarray(table["ok"], bool) & (table["target"] != "logits")
    x, y = table["alpha_grid"][m].astype(float), table["jac_peak_alpha"][m].astype(float)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.any():
        depth = np.asarray(table["depth"][m], int)
        cmap, norm, lo, hi = style.integer_colors(depth[finite])
        sc = ax.scatter(x, y, c=depth, s=6, cmap=cmap, norm=norm, alpha=0.6)
        style.integer_colorbar(fig, ax, sc, "recording depth (layers after L)", lo, hi)
    else:
        style.no_data(ax, "no successful pairs")
    ax.set(xlabel=r"boundary $\alpha^*$ (grid, on r)", ylabel=r"MLP Jacobian-norm peak $\alpha$",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    return _title(fig, table, "Does the MLP Jacobian peak at the boundary?", model_name)


BUILDERS = {"sharpness_by_depth": fig_sharpness_by_depth, "alpha_star_hist": fig_alpha_star_hist,
            "jac_vs_boundary": fig_jac_vs_boundary}


def save_all(table: Dict[str, np.ndarray], rows: List[dict], output_dir: str, *,
             model_name: str, n_layer: int, fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Writes every figure of :data:`FIGURES` as ``{output_dir}/{name}.{fmt}``; returns the
    paths."""
    return style.save_figures(BUILDERS, output_dir, table, rows, fmt=fmt, dpi=dpi,
                              model_name=model_name, n_layer=n_layer)
