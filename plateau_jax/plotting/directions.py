"""Figures of a directions run, drawn from its ``results.npz`` arrays (see docs/directions.md).

Step lengths are in units of D (the median distance between real activations at the site), KL in
nats. Every title names the model and the site; colours are fixed per direction type.
"""

from __future__ import annotations

import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plateau_jax import files  # noqa: E402
from plateau_jax.plotting.plateaus import _panels  # noqa: E402

FIGURES = ("kl_by_type", "thresholds", "sharpness", "sensitive_trace")
_COLORS = dict(zip(("real", "random", "matched", "cov_diff", "cov_sample", "mixture", "sensitive",
                    "steering"), plt.rcParams["axes.prop_cycle"].by_key()["color"]))


def _where(res) -> str:
    return f"{res['model_name']}, blocks.{int(res['layer'])}.hook_{res['site']}"


def _types(res) -> List[str]:
    return [str(t) for t in res["type_names"]]


def fig_kl_by_type(res):
    """Median KL (nats) against step length per direction type, with the IQR as a band."""
    fig, axes = _panels(1, 6.4, 4.2)
    ax = axes[0, 0]
    t = res["lengths"]
    for i, name in enumerate(_types(res)):
        c = _COLORS.get(name)
        ax.plot(t, res["summary_kl_median"][i], color=c, lw=1.8, label=name)
        ax.fill_between(t, res["summary_kl_q25"][i], res["summary_kl_q75"][i], color=c, alpha=0.2,
                        lw=0)
    ax.axhline(float(res["kl_threshold"]), color="0.5", ls=":", lw=1,
               label=f"threshold {float(res['kl_threshold']):g} nats")
    ax.set(xlabel="step length t (units of D = median distance between real activations)",
           ylabel="KL(p(x) ‖ p(x + tDu)) (nats)", xlim=(0, t[-1]))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Output change against perturbation length, median and IQR\n{_where(res)}",
                 fontsize=10)
    return fig


def fig_thresholds(res):
    """Histogram of activation thresholds per type (curves never reaching it are counted)."""
    names = _types(res)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = _panels(cols, 2.8, 2.4, rows=rows)
    for ax in axes.ravel()[len(names):]:
        ax.set_axis_off()
    thr, col_type = res["threshold"], np.asarray([str(t) for t in res["types"]])
    finite = thr[np.isfinite(thr)]
    hi = float(finite.max()) if finite.size else float(res["lengths"][-1])
    bins = np.linspace(0.0, max(hi, 1e-6), 21)
    for j, (ax, name) in enumerate(zip(axes.ravel(), names)):
        v = thr[:, col_type == name].ravel()
        ok = v[np.isfinite(v)]
        ax.hist(ok, bins=bins, color=_COLORS.get(name), alpha=0.85)
        ax.set_title(f"{name} (never: {np.sum(~np.isfinite(v))}/{v.size})", fontsize=9)
        ax.set(xlabel="threshold t* (units of D)" if j + cols >= len(names) else None,
               ylabel="count" if j % cols == 0 else None)
    fig.suptitle(f"Activation threshold: first t with KL ≥ {float(res['kl_threshold']):g} nats — "
                 f"{_where(res)}", fontsize=10)
    return fig


def fig_sharpness(res):
    """Sharpness S of the logits' relative-distance curve over t / t_max, per type (box plots;
    S = 1 is a straight line)."""
    names = _types(res)
    col_type = np.asarray([str(t) for t in res["types"]])
    s = res["sharpness"][..., -1]
    data = [s[:, col_type == n].ravel() for n in names]
    data = [d[np.isfinite(d)] for d in data]
    fig, axes = _panels(1, max(4.0, 0.9 * len(names) + 1.5), 3.6)
    ax = axes[0, 0]
    box = ax.boxplot(data, patch_artist=True, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), labels=names, rotation=30)
    for patch, n in zip(box["boxes"], names):
        patch.set_facecolor(_COLORS.get(n, "0.7"))
        patch.set_alpha(0.6)
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    ax.set(ylabel="sharpness S (logits' r over t / t_max)")
    ax.set_title(f"Sharpness by direction type — {_where(res)}", fontsize=10)
    return fig


def fig_sensitive_trace(res):
    """The sensitive-direction search: objective per iteration (best restart of each base point,
    median and IQR)."""
    fig, axes = _panels(1, 5.0, 3.4)
    ax = axes[0, 0]
    if "sensitive_trace" in res and res["sensitive_trace"].size:
        tr = res["sensitive_trace"][:, 0]  # [B, steps], best restart
        it = np.arange(tr.shape[1])
        q = np.percentile(tr, [25, 50, 75], axis=0)
        ax.plot(it, q[1], color=_COLORS["sensitive"], label="median over base points")
        ax.fill_between(it, q[0], q[2], color=_COLORS["sensitive"], alpha=0.2, lw=0, label="IQR")
        ax.legend(fontsize=8)
        unit = "nats" if str(res["sensitive_objective_name"]) == "kl" else "residual units"
        ax.set(xlabel="iteration", ylabel=f"objective ({str(res['sensitive_objective_name'])}, "
                                          f"{unit})")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no sensitive search in this run", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"Sensitive-direction search at t = {float(res.get('sensitive_length', np.nan)):g} "
                 f"D\n{_where(res)}", fontsize=10)
    return fig


_BUILDERS = {"kl_by_type": fig_kl_by_type, "thresholds": fig_thresholds,
             "sharpness": fig_sharpness, "sensitive_trace": fig_sensitive_trace}


def save_figures(builders, res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
                 dpi: int = 110) -> List[str]:
    """Draws ``{name: builder(res)}`` and saves each atomically as ``{output_dir}/{name}.{fmt}``
    (tight bounding box: nothing clipped); returns the paths."""
    paths = []
    for name, build in builders.items():
        fig = build(res)
        path = os.path.join(output_dir, f"{name}.{fmt}")
        files.atomic_savefig(fig, path, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def save_all(res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
             dpi: int = 110) -> List[str]:
    """Every figure of :data:`FIGURES`; returns the paths."""
    return save_figures(_BUILDERS, res, output_dir, fmt, dpi)
