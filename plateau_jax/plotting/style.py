"""The one figure style of the package: every figure module builds its figures through here.

* :func:`apply` sets the rcParams (font sizes, dpi, no offset text, the pair colour cycle);
  :func:`figure` calls it and returns a constrained-layout figure with an Agg canvas (no pyplot,
  no global backend switch, nothing to close).
* Colours: :func:`layer_color` gives a layer the same colour in every figure of a model
  (``viridis`` over ``0 .. n_layer - 1``); :func:`layer_colorbar` is the matching discrete
  colour bar with integer ticks. :func:`pair_color` gives prompt pair (or condition) ``i`` the
  same colour in every figure of a run; :data:`CONDITION_LINESTYLES` gives each freezing condition
  its line style.
* Axes: :func:`integer_axis` (layer axes: integer ticks only), :func:`log_axis` (log scale whose
  tick labels are plain numbers, ``1.1`` and not ``1.1x10^0``, on ranges narrower than a
  decade), :func:`alpha_axis` (the interpolation axis, endpoints marked).
* :func:`title`: every figure's title says what it shows and on which model.
* :func:`save` / :func:`save_figures`: atomic writes.
"""

from __future__ import annotations

import os
import textwrap
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib import font_manager
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from plateau_jax import files

LAYER_CMAP = "viridis"
#: Colour of prompt pair / condition ``i`` (cycled): the same in every figure of a run.
PAIR_COLORS = tuple(mcolors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors)
#: Line style of each freezing condition (colour stays the pair's).
CONDITION_LINESTYLES = {"none": "-", "attn": "--", "mlp": ":"}
CONDITION_LABELS = {"none": "normal", "attn": "attention frozen", "mlp": "MLP frozen"}
DPI = 120
ALPHA_LABEL = r"interpolation $\alpha$"

RC = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "figure.titlesize": 12,
    "axes.formatter.useoffset": False,  # no "+1.39e1" offset text
    "axes.formatter.limits": (-4, 5),
    "axes.prop_cycle": matplotlib.cycler(color=PAIR_COLORS),
    "image.cmap": LAYER_CMAP,
    "legend.framealpha": 0.85,
}


def apply() -> None:
    """Sets :data:`RC` in matplotlib's rcParams (called by :func:`figure`)."""
    matplotlib.rcParams.update(RC)


def figure(rows: int = 1, cols: int = 1, *, width: float = 4.2, height: float = 3.4,
           **subplot_kw):
    """``(fig, axes[rows, cols])``: constrained layout, panels of ``width`` x ``height`` inches."""
    apply()
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **subplot_kw)
    return fig, axes


# ----------------------------------------------------------------------------- colours

def layer_color(layer: int, n_layer: int):
    """The colour of ``layer`` in a model of ``n_layer`` layers (the same in every figure)."""
    return matplotlib.colormaps[LAYER_CMAP](int(layer) / max(int(n_layer) - 1, 1))


def pair_color(i: int) -> str:
    """The colour of prompt pair (or condition) ``i`` of a run."""
    return PAIR_COLORS[int(i) % len(PAIR_COLORS)]


def layer_colorbar(fig, axes, layers: Iterable[int], n_layer: int, label: str):
    """A discrete colour bar over ``min(layers) .. max(layers)``, one band per layer in the
    colour :func:`layer_color` gives it, integer ticks only."""
    layers = [int(l) for l in layers] or [0]
    lo, hi = min(layers), max(layers)
    span = np.arange(lo, hi + 1)
    cmap = mcolors.ListedColormap([layer_color(l, n_layer) for l in span])
    norm = mcolors.BoundaryNorm(np.arange(lo - 0.5, hi + 1.5), cmap.N)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    return integer_colorbar(fig, axes, mappable, label, lo, hi)


def integer_colorbar(fig, axes, mappable, label: str, lo: int, hi: int):
    """A colour bar of ``mappable`` whose ticks are integers in ``lo .. hi``."""
    ax = np.ravel(axes).tolist() if isinstance(axes, (list, np.ndarray)) else axes
    # the pad is a fraction of the parents' width: keep it near 0.15 in over several panels
    cb = fig.colorbar(mappable, ax=ax, label=label, pad=min(0.05, 0.15 / fig.get_figwidth()))
    locator = ticker.MaxNLocator(nbins=8, integer=True, steps=[1, 2, 5, 10], min_n_ticks=1)
    cb.set_ticks([int(round(v)) for v in locator.tick_values(lo, hi) if lo <= round(v) <= hi]
                 or [lo])
    cb.minorticks_off()
    return cb


def integer_colors(values: Sequence[int]):
    """``(cmap, norm, lo, hi)``: a discrete viridis scale over the integers ``lo = min .. hi =
    max`` of ``values`` (e.g. a depth), for scatter plots with :func:`integer_colorbar`."""
    lo, hi = int(np.min(values)), int(np.max(values))
    cmap = matplotlib.colormaps[LAYER_CMAP].resampled(hi - lo + 1)
    return cmap, mcolors.BoundaryNorm(np.arange(lo - 0.5, hi + 1.5), cmap.N), lo, hi


# ----------------------------------------------------------------------------- axes

def integer_axis(ax, which: str = "x") -> None:
    """Integer tick positions only on the ``which`` axis ("x", "y" or "both") (layer axes)."""
    for name in ("x", "y") if which == "both" else (which,):
        axis = getattr(ax, f"{name}axis")
        axis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10],
                                                  min_n_ticks=1))
        axis.set_minor_locator(ticker.NullLocator())


def _positional(x: float, digits: int) -> str:
    return np.format_float_positional(x, precision=digits, unique=True, fractional=False,
                                      trim="-")


class PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Log-axis tick labels: plain numbers (``1.06``, ``1.1``) when the view spans less than a
    decade, with just enough significant digits to tell the labelled ticks apart; powers of ten
    (``10^-4``) on wider ranges."""

    def set_locs(self, locs=None):
        super().set_locs(locs)  # LogFormatter's ignores ``locs``; the digits need them
        self._all_locs = [] if locs is None else list(locs)

    def _narrow(self) -> bool:
        vmin, vmax = sorted(self.axis.get_view_interval())
        return vmin > 0 and vmax / vmin < 10.0

    def _digits(self, vmin, vmax) -> int:
        sci = super().__call__  # (a comprehension has no zero-argument super())
        labelled = [x for x in getattr(self, "_all_locs", ()) if vmin <= x <= vmax and sci(x)]
        for digits in range(1, 7):
            if len({_positional(x, digits) for x in labelled}) == len(labelled):
                return digits
        return 7

    def __call__(self, x, pos=None):
        s = super().__call__(x, pos)
        if not s or not self._narrow():
            return s
        vmin, vmax = sorted(self.axis.get_view_interval())
        return self.fix_minus(_positional(x, self._digits(vmin, vmax)))


def log_axis(ax, which: str = "y") -> None:
    """Log scale on the ``which`` axis with :class:`PlainLogFormatter` labels."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def alpha_axis(ax, endpoints=None, *, label: str = ALPHA_LABEL) -> None:
    """The interpolation axis: x from 0 to 1, labelled; with ``endpoints`` (A, B) the two tokens
    are written on a top axis above alpha = 0 and 1."""
    ax.set_xlim(0, 1)
    if label:
        ax.set_xlabel(label)
    if endpoints is None:
        return
    token_a, token_b = endpoints
    top = ax.secondary_xaxis("top")
    top.set_xticks([0.0, 1.0], labels=[f"A: {str(token_a)!r}", f"B: {str(token_b)!r}"])
    top.tick_params(length=4, labelsize=8)
    for x in (0.0, 1.0):
        ax.axvline(x, color="0.8", lw=0.8, zorder=0)


def key_legend(ax, colors, styles=(), **kwargs):
    """A legend that keys colours and line styles apart: ``colors`` ``[(label, colour)]`` (e.g.
    one per pair, :func:`pair_color`) and ``styles`` ``[(label, linestyle, marker)]`` (drawn in
    grey), for panels whose curves combine the two."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=label) for label, c in colors]
    handles += [Line2D([], [], color="0.35", ls=ls, marker=m, ms=4, label=label)
                for label, ls, m in styles]
    return ax.legend(handles=handles, **kwargs)


def pair_colors(pair_names: Sequence[str]):
    """``[(name, colour)]`` of a run's pairs, for :func:`key_legend`."""
    return [(n, pair_color(i)) for i, n in enumerate(pair_names)]


def pair_name(endings) -> str:
    """``' big' → ' in'``: a prompt pair's endings (A, B) as figures write them."""
    return f"{str(endings[0])!r} → {str(endings[1])!r}"


# ----------------------------------------------------------------------------- titles

def _chars(fig, fontsize: float) -> int:
    """About how many characters of ``fontsize`` fit across ``fig``."""
    return max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))


def _join(parts: Sequence[str], chars: int, sep: str = " · ") -> List[str]:
    """``parts`` joined by ``sep`` into lines of at most ``chars`` characters, broken between
    parts where possible."""
    lines: List[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(sep) + len(part) <= chars:
            lines[-1] += sep + part
        else:
            lines += textwrap.wrap(part, chars, break_on_hyphens=False) or [""]
    return lines


def title(fig, what: str, model_name: str, *details: str):
    """Sets the figure's title: ``what`` it shows, then on which model (and ``details`` such
    as the site or the prompt pair), wrapped to the figure's width."""
    size = font_manager.FontProperties(
        size=matplotlib.rcParams["figure.titlesize"]).get_size_in_points()
    chars = _chars(fig, size)
    where = [f"model: {model_name}"] + [str(d) for d in details if d]
    fig.suptitle("\n".join(_join([what], chars) + _join(where, chars)))
    return fig


def no_data(ax, text: str = "no data") -> None:
    """Writes ``text`` in the middle of an empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


# ----------------------------------------------------------------------------- saving

def save(fig, path: str, dpi: Optional[int] = None) -> str:
    """Writes ``fig`` atomically (format from the extension); returns ``path``."""
    files.atomic_savefig(fig, path, dpi=dpi or DPI)
    return path


def save_figures(builders: Dict[str, Callable], output_dir: str, *args, fmt: str = "png",
                 dpi: Optional[int] = None, suffix: str = "", **kwargs) -> List[str]:
    """Draws ``builder(*args, **kwargs)`` of each ``{name: builder}`` (a builder may return
    ``None``: no figure from these results) and writes it atomically as
    ``{output_dir}/{name}{suffix}.{fmt}``; returns the paths written."""
    paths = []
    for name, build in builders.items():
        fig = build(*args, **kwargs)
        if fig is not None:
            paths.append(save(fig, os.path.join(output_dir, f"{name}{suffix}.{fmt}"), dpi))
    return paths
