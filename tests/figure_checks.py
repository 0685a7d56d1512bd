"""What every figure of the package must satisfy (used by tests/test_figures.py): a title that
names the model, nothing clipped, integer ticks on layer axes, readable tick labels."""

import re

from matplotlib.text import Text

LAYER_AXIS = re.compile(r"\blayer\b|\bdepth\b", re.I)  # not "mean over layers"
SCI_LABEL = re.compile(r"\\times\s*10\^|x10\^|×\s*10")
TOL = 1.0  # pixels


def _all_axes(fig):
    """Every axes of ``fig``, colour bars and secondary/twin axes included."""
    out, todo = [], list(fig.axes)
    while todo:
        ax = todo.pop()
        if ax not in out:
            out.append(ax)
            todo += list(getattr(ax, "child_axes", []))
    return out


def _drawn_ticks(axis):
    """The ticks the last draw actually drew (in view), major and minor."""
    if not (axis.axes.axison and axis.get_visible()):
        return []
    return axis._update_ticks()


def _tick_labels(axis):
    return [lab for t in _drawn_ticks(axis) for lab in (t.label1, t.label2)
            if lab.get_visible() and lab.get_text().strip()]


def _texts(fig):
    """Every visible, non-empty text the figure draws (tick labels only of drawn ticks)."""
    tick_labels, drawn = set(), set()
    for ax in _all_axes(fig):
        for axis in (ax.xaxis, ax.yaxis):
            for t in axis.get_major_ticks() + axis.get_minor_ticks():
                tick_labels.update((id(t.label1), id(t.label2)))
            drawn.update(id(lab) for lab in _tick_labels(axis))
    out = []
    for t in fig.findobj(Text):
        if not (t.get_visible() and t.get_text().strip()):
            continue
        if id(t) in tick_labels and id(t) not in drawn:
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        out.append(t)
    return out


def problems(fig, model_name: str):
    """A list of what is wrong with ``fig`` (empty: nothing)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    if not suptitle.strip():
        found.append("no figure title")
    elif model_name not in suptitle:
        found.append(f"title {suptitle!r} does not name the model {model_name!r}")
    box = fig.bbox
    for t in _texts(fig):
        b = t.get_window_extent(renderer)
        if b.x0 < box.x0 - TOL or b.y0 < box.y0 - TOL or b.x1 > box.x1 + TOL or b.y1 > box.y1 + TOL:
            found.append(f"text {t.get_text()!r} is clipped: {b.bounds} outside {box.bounds}")
    for ax in _all_axes(fig):
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            label = axis.get_label_text()
            if not axis.get_visible():
                continue
            if LAYER_AXIS.search(label):
                locs = [t.get_loc() for t in _drawn_ticks(axis)]
                bad = [x for x in locs if abs(x - round(x)) > 1e-9]
                if bad:
                    found.append(f"layer axis {label!r} has ticks at {bad}")
            labels = _tick_labels(axis)
            if axis.get_scale() == "log":
                lo, hi = sorted(axis.get_view_interval())
                if lo > 0 and hi / lo < 10:
                    sci = [lab.get_text() for lab in labels if SCI_LABEL.search(lab.get_text())]
                    if sci:
                        found.append(f"log axis {label!r} over [{lo:.3g}, {hi:.3g}] labels {sci}")
            boxes = [lab.get_window_extent(renderer) for lab in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    inter = boxes[i].intersection(boxes[i], boxes[j])
                    if inter is not None and inter.width > TOL and inter.height > TOL:
                        found.append(f"{name} tick labels {labels[i].get_text()!r} and "
                                     f"{labels[j].get_text()!r} of {label!r} overlap")
    return found
