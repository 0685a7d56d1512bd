"""The emergence figure (``emergence.png`` of ``python -m experiments.emergence``), drawn from its
``results.json`` (loaded as a dict): how the sharpness S, the boundary alpha* and the MLP
Jacobian peaks change over the checkpoints of a training run.

Top row: medians over prompt pairs (IQR shaded) against the training step (log axis, the
initialisation plotted at step 1) of S, alpha* and the Jacobian-peak offset |alpha_peak - alpha*|.
Bottom row: one pair's r(alpha) and deepest-layer Jacobian norm at every checkpoint (colour =
checkpoint, :func:`step_color`), and the peak contrast.
"""

from __future__ import annotations

from typing import List, Optional

import matplotlib
import numpy as np

from plateau_jax.plotting import style

FIGURES = ("emergence",)
STEP_CMAP = "plasma"  # checkpoints; not the layer colour map


def step_color(j: int, n: int):
    """The colour of checkpoint ``j`` of ``n`` (early = dark, late = light)."""
    return matplotlib.colormaps[STEP_CMAP](0.85 * j / max(n - 1, 1))


def _median_iqr(ax, xs, summ, key, color, ylabel, title):
    """Median over pairs against the training step, with the IQR shaded (log step axis)."""
    ax.plot(xs, [r[key]["median"] for r in summ], "o-", color=color, label="median over pairs")
    ax.fill_between(xs, [r[key]["q1"] for r in summ], [r[key]["q3"] for r in summ],
                    color=color, alpha=0.2, label="IQR over pairs")
    style.log_axis(ax, "x")
    ax.set(xlabel="training step (initialisation at 1)", ylabel=ylabel, title=title)


def fig_emergence(res: dict, *, model_name: str, focus: int = 0):
    """S and alpha* medians/IQRs against the training step, the Jacobian-peak offset and
    contrast, and pair ``focus``'s r(alpha) and deepest-layer Jacobian curves at every step."""
    alpha = np.asarray(res["alpha"])
    ckpts, summ = res["checkpoints"], res["summary"]
    xs = [max(c["step"], 1) for c in ckpts]
    fig, axes = style.figure(2, 3, width=4.6, height=3.6)
    (ax_s, ax_a, ax_off), (ax_r, ax_j, ax_c) = axes
    _median_iqr(ax_s, xs, summ, "S", style.pair_color(0), "sharpness S",
                "sharpness S of r(α), logits")
    ax_s.axhline(1.0, color="gray", lw=0.8, ls=":")
    _median_iqr(ax_a, xs, summ, "boundary_alpha", style.pair_color(2), r"$\alpha^*$",
                r"boundary $\alpha^*$ (steepest step of r)")
    ax_a.set_ylim(0, 1)
    _median_iqr(ax_off, xs, summ, "mean_peak_offset", style.pair_color(3),
                r"|$\alpha_{peak} - \alpha^*$|, mean over layers",
                "MLP Jacobian peak vs boundary")
    ax_off.axhline(res.get("chance_peak_offset", np.nan), color="gray", ls=":",
                   label="chance (uniform peak)")
    _median_iqr(ax_c, xs, summ, "mean_contrast", style.pair_color(4),
                "max / median over α, mean over layers", "MLP Jacobian peak contrast")
    for ax in (ax_s, ax_a, ax_off, ax_c):
        ax.legend()
    first = ckpts[0]["pairs"][focus]
    deepest = max(first["jacobian"], key=int)
    for j, c in enumerate(ckpts):
        p = c["pairs"][focus]
        color = step_color(j, len(ckpts))
        ax_r.plot(alpha, p["r"], color=color, label=f"step {c['step']} (S = {p['S']:.2f})")
        n = np.asarray(p["jacobian"][deepest]["norms"])
        ax_j.plot(alpha, n / np.mean(n), color=color)
    ax_r.set(title=f"r(α) of the logits: {first['label']}", ylabel="relative distance r")
    ax_r.legend(loc="upper left")
    ax_j.set(title=f"MLP Jacobian norm, layer {deepest} (same pair)", ylabel="norm / mean over α")
    for ax in (ax_r, ax_j):
        style.alpha_axis(ax)
    return style.title(fig, "Emergence of plateaus during training", model_name,
                       f"interpolation at blocks.{res['layer']}.hook_resid_post",
                       f"{res['path']} path", f"{len(ckpts[0]['pairs'])} pairs")


BUILDERS = {"emergence": fig_emergence}


def save_all(res: dict, output_dir: str, *, model_name: str, focus: int = 0, fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Writes ``{output_dir}/emergence.{fmt}``; returns the paths."""
    return style.save_figures(BUILDERS, output_dir, res, fmt=fmt, dpi=dpi, model_name=model_name,
                              focus=focus)
