"""Figures of a directions run, drawn from its ``results.npz`` arrays (see docs/directions.md).

Step lengths are in units of D (the median distance between real activations at the site), KL in
nats. Every title names the model and the site; colours are fixed per direction type.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from plateau_jax.plotting import style

FIGURES = ("kl_by_type", "thresholds", "sharpness", "sensitive_trace")
_TYPES = ("real", "random", "matched", "cov_diff", "cov_sample", "mixture", "sensitive", "steering")
#: One colour per direction type, the same in every figure.
TYPE_COLORS = {t: style.pair_color(i) for i, t in enumerate(_TYPES)}


def _title(fig, res, what: str):
    return style.title(fig, what, str(res["model_name"]),
                       f"blocks.{int(res['layer'])}.hook_{res['site']}")


def _types(res) -> List[str]:
    return [str(t) for t in res["type_names"]]


def fig_kl_by_type(res):
    """Median KL (nats) against step length per direction type, with the IQR as a band."""
    fig, axes = style.figure(1, 1, width=7.4, height=4.4)
    ax = axes[0, 0]
    t = res["lengths"]
    for i, name in enumerate(_types(res)):
        c = TYPE_COLORS.get(name)
        ax.plot(t, res["summary_kl_median"][i], color=c, lw=1.8, label=name)
        ax.fill_between(t, res["summary_kl_q25"][i], res["summary_kl_q75"][i], color=c, alpha=0.2,
                        lw=0)
    ax.axhline(float(res["kl_threshold"]), color="0.5", ls=":", lw=1,
               label=f"threshold {float(res['kl_threshold']):g} nats")
    ax.set(xlabel="step length t (units of D = median distance\nbetween real activations)",
           ylabel="KL(p(x) ‖ p(x + tDu)) (nats)", xlim=(0, t[-1]))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _title(fig, res, "Output change against perturbation length: median and IQR over "
                            "base points and directions")


def fig_thresholds(res):
    """Histogram of activation thresholds per type (curves never reaching it are counted)."""
    names = _types(res)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = style.figure(rows, cols, width=3.0, height=2.5)
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    thr, col_type = res["threshold"], np.asarray([str(t) for t in res["types"]])
    finite = thr[np.isfinite(thr)]
    hi = float(finite.max()) if finite.size else float(res["lengths"][-1])
    bins = np.linspace(0.0, max(hi, 1e-6), 21)
    for j, (ax, name) in enumerate(zip(axes.ravel(), names)):
        v = thr[:, col_type == name].ravel()
        ok = v[np.isfinite(v)]
        ax.hist(ok, bins=bins, color=TYPE_COLORS.get(name), alpha=0.85)
        ax.set_title(f"{name} (never: {np.sum(~np.isfinite(v))}/{v.size})")
        ax.set(xlabel="threshold t* (units of D)" if j + cols >= len(names) else None,
               ylabel="curves" if j % cols == 0 else None)
        style.integer_axis(ax, "y")
    return _title(fig, res, f"Activation threshold: the first t with KL ≥ "
                            f"{float(res['kl_threshold']):g} nats, per direction type")


def fig_sharpness(res):
    """Sharpness S of the logits' relative-distance curve over t / t_max, per type (box plots;
    S = 1 is a straight line)."""
    names = _types(res)
    col_type = np.asarray([str(t) for t in res["types"]])
    s = res["sharpness"][..., -1]
    data = [s[:, col_type == n].ravel() for n in names]
    data = [d[np.isfinite(d)] for d in data]
    fig, axes = style.figure(1, 1, width=max(5.0, 0.9 * len(names) + 1.5), height=3.8)
    ax = axes[0, 0]
    box = ax.boxplot(data, patch_artist=True, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), labels=names, rotation=30, ha="right")
    for patch, n in zip(box["boxes"], names):
        patch.set_facecolor(TYPE_COLORS.get(n, "0.7"))
        patch.set_alpha(0.6)
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    ax.set(ylabel="sharpness S\n(logits' r over t / t_max)")
    return _title(fig, res, "Sharpness by direction type (S = 1: a straight line)")


def fig_sensitive_trace(res):
    """The sensitive-direction search: objective per iteration (best restart of each base point,
    median and IQR)."""
    fig, axes = style.figure(1, 1, width=5.6, height=3.8)
    ax = axes[0, 0]
    if "sensitive_trace" in res and res["sensitive_trace"].size:
        tr = res["sensitive_trace"][:, 0]  # [B, steps], best restart
        it = np.arange(tr.shape[1])
        q = np.percentile(tr, [25, 50, 75], axis=0)
        color = TYPE_COLORS["sensitive"]
        ax.plot(it, q[1], color=color, label="median over base points")
        ax.fill_between(it, q[0], q[2], color=color, alpha=0.2, lw=0, label="IQR")
        ax.legend(loc="lower right")
        unit = "nats" if str(res["sensitive_objective_name"]) == "kl" else "residual units"
        ax.set(xlabel="iteration", ylabel=f"objective ({res['sensitive_objective_name']}, {unit})")
        style.integer_axis(ax, "x")
        what = f"Sensitive-direction search at t = {float(res['sensitive_length']):g} D"
    else:
        style.no_data(ax, "no sensitive search in this run")
        ax.set_axis_off()
        what = "Sensitive-direction search"
    return _title(fig, res, what)


BUILDERS = {"kl_by_type": fig_kl_by_type, "thresholds": fig_thresholds,
            "sharpness": fig_sharpness, "sensitive_trace": fig_sensitive_trace}


def save_all(res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Every figure of :data:`FIGURES`; returns the paths."""
    return style.save_figures(BUILDERS, output_dir, res, fmt=fmt, dpi=dpi)
