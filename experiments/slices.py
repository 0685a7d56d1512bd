"""2-D slices of the residual stream at a site: a grid over a plane through three real
activations (or one activation and two directions) through the rest of the model in one batched
call; maps of the argmax next token, the KL to each anchor and the relative distance.

    python -m experiments.slices --output_dir=runs/slices                       # shipped model
    python -m experiments.slices --plane=directions --axes=sensitive,random --output_dir=runs/s2

Writes ``config.json``, ``reference.npz``, ``slices.npz`` (docs/directions.md lists every array)
and ``slice_argmax``, ``slice_kl``, ``slice_rel_distance`` figures.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import plateau_jax
from experiments import common
from experiments import perturb_common as pc
from plateau_jax import files
from plateau_jax.plateaus import directions as D
from plateau_jax.plateaus import reference as reference_lib
from plateau_jax.plateaus import slices as S
from plateau_jax.plotting import slices as plotting

FLAGS = flags.FLAGS
pc.define_flags()
flags.DEFINE_enum("plane", "anchors", ["anchors", "directions"],
                  "anchors: the plane through the activations of context + each of three "
                  "--endings; directions: through context + the first ending, spanned by --axes.")
flags.DEFINE_string("context", "The house was", "Shared context of every anchor (no BOS).")
flags.DEFINE_list("endings", ["big", "in", "large"],
                  "Anchor endings, each joined to the context with one space (one token each).")
flags.DEFINE_list("axes", ["sensitive", "random"],
                  "--plane=directions: the two direction types spanning the plane (real = towards "
                  "the second ending; random; matched; cov_diff; sensitive).")
flags.DEFINE_integer("grid", 64, "Grid points per axis (grid x grid points).")
flags.DEFINE_list("extent", [], "s_lo,s_hi,t_lo,t_hi in units of D (default: the anchors' "
                  "bounding box widened by --margin).")
flags.DEFINE_float("margin", 0.5, "Margin around the anchors (units of D) of the default extent.")
flags.DEFINE_integer("chunk", 512, "Grid rows per step inside the one jitted call (memory bound).")
flags.DEFINE_float("sensitive_length", 0.5, "Length (units of D) of the sensitive axis' search.")

AXIS_TYPES = ("real", "random", "matched", "cov_diff", "sensitive")


def check_flags() -> None:
    pc.check_common_flags()
    if FLAGS.grid < 1:
        raise pc.InputError(f"--grid={FLAGS.grid}: a grid needs at least 1 point per axis.")
    if FLAGS.chunk < 1:
        raise pc.InputError("--chunk must be >= 1.")
    need = 3 if FLAGS.plane == "anchors" else 1
    if len(FLAGS.endings) < need or len(set(FLAGS.endings)) != len(FLAGS.endings):
        raise pc.InputError(f"--endings={FLAGS.endings}: --plane={FLAGS.plane} needs {need} "
                            "distinct endings" + (" (three anchors)." if need == 3 else "."))
    if FLAGS.plane == "anchors" and len(FLAGS.endings) != 3:
        raise pc.InputError(f"--endings={FLAGS.endings}: a plane through anchors needs exactly 3.")
    if FLAGS.plane == "directions":
        bad = [a for a in FLAGS.axes if a not in AXIS_TYPES]
        if len(FLAGS.axes) != 2 or bad:
            raise pc.InputError(f"--axes={FLAGS.axes}: give two of {AXIS_TYPES}.")
        if "real" in FLAGS.axes and len(FLAGS.endings) < 2:
            raise pc.InputError("--axes=real points towards the second ending: give two --endings.")
    if FLAGS.extent:
        try:
            ext = [float(v) for v in FLAGS.extent]
        except ValueError:
            ext = []
        if len(ext) != 4 or not (ext[1] > ext[0] and ext[3] > ext[2]):
            raise pc.InputError(f"--extent={FLAGS.extent}: expected s_lo,s_hi,t_lo,t_hi with "
                                "lo < hi.")
    if not FLAGS.margin > 0 or not FLAGS.sensitive_length > 0:
        raise pc.InputError("--margin and --sensitive_length must be > 0.")


def anchors_from_flags(model):
    """Context ids, the anchors' token ids and their activations ``[K, d]`` at the site."""
    from plateau_jax.plateaus import prompts as prompts_lib
    ctx = model.to_tokens(FLAGS.context)
    endings = [" " + e.strip() for e in FLAGS.endings]
    pairs = [prompts_lib.encode_pair(model.tokenizer, FLAGS.context, endings[0], e,
                                     model.config.n_positions) for e in endings[1:]] \
        if len(endings) > 1 else []
    if pairs:
        tokens = [pairs[0].token_a] + [p.token_b for p in pairs]
    else:
        full = model.to_tokens(FLAGS.context + endings[0])
        if len(full) != len(ctx) + 1 or not np.array_equal(full[:-1], ctx):
            raise pc.InputError(f"ending {endings[0]!r} is not one token after the context.")
        tokens = [int(full[-1])]
    prompts = [np.append(ctx, t).astype(np.int32) for t in tokens]
    acts = np.asarray(reference_lib.collect_activations(model, prompts, FLAGS.layer, FLAGS.site))
    return ctx, tokens, prompts, acts


def axis_direction(name, model, prompts, acts, ref, key):
    x = acts[:1]
    if name == "real":
        return acts[1] - acts[0]
    if name == "random":
        return np.asarray(D.random_directions(key, 1, 1, x.shape[1]))[0, 0]
    if name in ("matched", "cov_diff"):
        f = jnp.asarray(ref.gaussian_factor(), jnp.float32)
        m = jnp.asarray(ref.mean, jnp.float32)
        u = (D.matched_directions(key, jnp.asarray(x), m, f, 1) if name == "matched"
             else D.cov_diff_directions(key, m, f, 1, 1))
        return np.asarray(u)[0, 0]
    res = D.find_sensitive_directions(model, prompts[:1], x, FLAGS.layer, FLAGS.site,
                                      ref.typical_distance, length=FLAGS.sensitive_length,
                                      seed=FLAGS.seed)
    return res.best[0, 0]


@common.cli
def main(argv):
    del argv
    pc.run("slices", __name__, check_flags, compute)


def compute(model, ref, out: str) -> None:
    """Everything of one run, written into the staging directory ``out``."""
    ctx, tokens, prompts, acts = anchors_from_flags(model)
    labels = [model.tokenizer.decode([t]) for t in tokens]
    if FLAGS.plane == "anchors":
        plane = S.plane_from_anchors(*acts, ref.typical_distance)
    else:
        k1, k2 = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
        u1, u2 = (axis_direction(n, model, prompts, acts, ref, k)
                  for n, k in zip(FLAGS.axes, (k1, k2)))
        plane = S.plane_from_directions(acts[0], u1, u2, ref.typical_distance)
        labels = labels[:1]
    if FLAGS.extent:
        e = [float(v) for v in FLAGS.extent]
        (s_lo, s_hi), (t_lo, t_hi) = (e[0], e[1]), (e[2], e[3])
    else:
        (s_lo, s_hi), (t_lo, t_hi) = S.default_extent(plane, FLAGS.margin)
    s, t = S.grid_axis(s_lo, s_hi, FLAGS.grid), S.grid_axis(t_lo, t_hi, FLAGS.grid)
    cache = plateau_jax.run_prefix(model, ctx)
    logging.info("%d x %d grid points in one call", s.size, t.size)
    sl = S.compute_slice(model, cache, plane, FLAGS.layer, FLAGS.site, s, t, chunk=FLAGS.chunk)
    ids, counts = np.unique(sl.top, return_counts=True)
    order = ids[np.argsort(-counts)]
    res = dict(
        model_name=np.str_(model.name), layer=np.int64(FLAGS.layer), site=np.str_(FLAGS.site),
        plane=np.str_(FLAGS.plane), context=np.str_(FLAGS.context), s=s, t=t,
        typical_distance=np.float64(ref.typical_distance), origin=plane.origin, e1=plane.e1,
        e2=plane.e2, anchors=plane.anchors, anchor_coords=plane.anchor_coords,
        anchor_labels=np.asarray(labels), anchor_top=sl.anchor_top, top=sl.top, kl=sl.kl,
        dist=sl.dist,
        rel_distance=sl.rel_distance() if sl.dist.shape[0] > 1 else np.zeros((0, 0)),
        token_ids=order, token_strings=np.asarray([model.tokenizer.decode([int(i)])
                                                   for i in order]),
        token_counts=np.sort(counts)[::-1])
    files.atomic_save_npz(os.path.join(out, "slices.npz"), **res)
    paths = plotting.save_all(res, out, FLAGS.figure_format)
    logging.info("Staged reference.npz, slices.npz, %s",
                 ", ".join(os.path.basename(p) for p in paths))


if __name__ == "__main__":
    common.run(main)
