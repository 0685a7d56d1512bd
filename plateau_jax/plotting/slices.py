"""Figures of a 2-D slice (``slices.npz`` of ``python -m experiments.slices``): the plane's grid
coloured by the argmax next token, by the KL to each anchor, and by the relative distance between
the first two anchors; anchors marked. Axes in units of D (orthonormal plane axes, so the
picture keeps distances and angles)."""

from __future__ import annotations

from typing import Dict, List, Optional

import matplotlib
import matplotlib.patches
import numpy as np

from plateau_jax.plotting import style

FIGURES = ("slice_argmax", "slice_kl", "slice_rel_distance")
TOP_TOKENS = 12


def _title(fig, res, what: str):
    return style.title(fig, what, str(res["model_name"]),
                       f"blocks.{int(res['layer'])}.hook_{res['site']}")


def _image(ax, res, values, **kwargs):
    s, t = res["s"], res["t"]
    extent = (s[0], s[-1], t[0], t[-1])
    im = ax.imshow(np.asarray(values).T, origin="lower", extent=extent, aspect="equal",
                   interpolation="nearest", **kwargs)
    _anchors(ax, res)
    ax.set(xlabel="e1 (units of D)", ylabel="e2 (units of D)")
    return im


def _anchors(ax, res):
    for k, (x, y) in enumerate(res["anchor_coords"]):
        ax.plot(x, y, marker="o", ms=7, mfc="white", mec="black", mew=1.5)
        ax.annotate(str(res["anchor_labels"][k]), (x, y), xytext=(5, 5),
                    textcoords="offset points", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))


def fig_slice_argmax(res):
    """The argmax next token at each grid point (the most frequent tokens get their own colour,
    the rest are grey)."""
    top = np.asarray(res["top"])
    ids, counts = np.unique(top, return_counts=True)
    keep = ids[np.argsort(-counts)][:TOP_TOKENS]
    index = np.full(top.shape, len(keep), dtype=np.int32)
    for j, tok in enumerate(keep):
        index[top == tok] = j
    colors = list(matplotlib.colormaps["tab20"].colors[: len(keep)]) + [(0.85, 0.85, 0.85)]
    cmap = matplotlib.colors.ListedColormap(colors)
    fig, axes = style.figure(1, 1, width=7.0, height=4.8)
    ax = axes[0, 0]
    _image(ax, res, index, cmap=cmap, vmin=-0.5, vmax=len(keep) + 0.5)
    labels = [repr(str(t)) for t in res["token_strings"][: len(keep)]]
    handles = [matplotlib.patches.Patch(color=colors[j], label=labels[j]) for j in range(len(keep))]
    if len(ids) > len(keep):
        handles.append(matplotlib.patches.Patch(color=colors[-1], label="other"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="argmax token")
    return _title(fig, res, "Next-token argmax over the plane")


def fig_slice_kl(res):
    """``KL(p_anchor || p_point)`` (nats) to each anchor, one panel each (shared colour scale)."""
    kl = np.asarray(res["kl"])
    K = kl.shape[0]
    fig, axes = style.figure(1, K, width=4.0, height=3.6)
    vmax = float(np.nanpercentile(kl, 99)) or 1.0
    for k, ax in enumerate(axes[0]):
        im = _image(ax, res, kl[k], cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(f"KL to anchor {str(res['anchor_labels'][k])!r}")
        if k:
            ax.set_ylabel("")
    fig.colorbar(im, ax=axes[0].tolist(), label="KL (nats)", shrink=0.9)
    return _title(fig, res, "KL divergence from each anchor's next-token distribution")


def fig_slice_rel_distance(res):
    """The study's relative distance of the logits between anchors 0 and 1 (0 at the first,
    1 at the second)."""
    fig, axes = style.figure(1, 1, width=5.6, height=4.6)
    ax = axes[0, 0]
    if np.asarray(res["rel_distance"]).size:
        im = _image(ax, res, res["rel_distance"], cmap="coolwarm", vmin=0.0, vmax=1.0)
        fig.colorbar(im, ax=ax, label="relative distance r of the logits")
        a, b = (str(x) for x in res["anchor_labels"][:2])
        ax.set_title(f"r = d({a!r}) / (d({a!r}) + d({b!r}))")
        return _title(fig, res, "Relative distance of the logits between the first two anchors")
    im = _image(ax, res, np.asarray(res["kl"])[0], cmap="magma")
    fig.colorbar(im, ax=ax, label="KL (nats)")
    return _title(fig, res, "One anchor only: KL divergence from its next-token distribution")


BUILDERS = {"slice_argmax": fig_slice_argmax, "slice_kl": fig_slice_kl,
             "slice_rel_distance": fig_slice_rel_distance}


def save_all(res: Dict[str, np.ndarray], output_dir: str, fmt: str = "png",
             dpi: Optional[int] = None) -> List[str]:
    """Every figure of :data:`FIGURES`; returns the paths."""
    return style.save_figures(BUILDERS, output_dir, res, fmt=fmt, dpi=dpi)
