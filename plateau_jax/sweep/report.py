"""Aggregation of a sweep directory: per-pair table, summary (Markdown + CSV), figures (drawn by
:mod:`plateau_jax.plotting.sweep`).

Outputs (published together in ``output_dir/report``, a symlink to a hidden version directory
replaced atomically, see :class:`plateau_jax.files.Publication`)::

    stats.csv        one row per (pair, interpolation layer, target): every statistic
    summary.csv/.md  per (interpolation layer, target): sharpness medians and IQRs (S_r on the
                     relative distance r, S_d on the distance curve d; grid and refined),
                     boundary location, plateau fraction, how well the Jacobian-norm and
                     spline-density peaks predict the boundary, plateau vs non-plateau split;
                     n (ok pairs), n_failed, n_expected (pairs in the sweep): n < n_expected
                     means failed or missing pairs. summary.md says whether the sweep is complete
    sharpness_by_depth.png, alpha_star_hist.png, jac_vs_boundary.png

"Predicts": ``|jac_peak_alpha - alpha*_grid| <= one grid step`` (``jac_within_step``) and the
Pearson correlation of the two over pairs (``jac_corr``); ``*_logits`` compares a layer's peak
with the logits' boundary of the same pair instead.
"""

from __future__ import annotations

import csv
import io as _io
import os
from typing import Dict, List

import numpy as np

from plateau_jax import files
from plateau_jax.sweep import runner
from plateau_jax.sweep.stats import STAT_NAMES


class NotASweepError(ValueError):
    """The directory holds no sweep (no readable manifest.json)."""


def load_manifest(output_dir: str) -> dict:
    if not os.path.isdir(output_dir):
        raise NotASweepError(f"{output_dir}: no such directory (give the --output_dir of an "
                             "experiments.sweep run).")
    manifest = runner.read_manifest(output_dir)
    if manifest is None:
        raise NotASweepError(f"{output_dir} holds no {runner.MANIFEST}: not a sweep directory "
                             "(run experiments.sweep with this --output_dir first).")
    if manifest.get("config", {}).get("format") != runner.FORMAT_VERSION:
        raise NotASweepError(f"{output_dir} holds a sweep of format "
                             f"{manifest.get('config', {}).get('format')}, this version reads "
                             f"format {runner.FORMAT_VERSION}: rerun the sweep (with --overwrite).")
    return manifest


def load_table(output_dir: str) -> Dict[str, np.ndarray]:
    """Long table ``{column: [rows]}`` over every shard; rows for targets upstream of the
    interpolation layer are dropped. Also returns the manifest under key ``"_manifest"`` and the
    number of shards read under ``"_shards"``."""
    manifest = load_manifest(output_dir)
    h = manifest["config_hash"]
    n_layer = manifest["config"]["model"]["config"]["n_layer"]
    labels = runner.target_labels(n_layer)
    cols: Dict[str, List[np.ndarray]] = {}
    shard_dir = os.path.join(output_dir, "shards")
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".npz")) \
        if os.path.isdir(shard_dir) else []
    for name in names:
        with np.load(os.path.join(shard_dir, name)) as z:
            if str(z["config_hash"]) != h:
                raise runner.ConfigMismatchError(f"shard {name} belongs to another configuration.")
            L = int(z["layer"])
            B = z["pair_index"].shape[0]
            tgt = np.arange(L + 1, n_layer + 1)
            rep = lambda v: np.repeat(np.asarray(v), len(tgt))
            cols.setdefault("pair_index", []).append(rep(z["pair_index"]))
            cols.setdefault("line", []).append(rep(z["line"]))
            cols.setdefault("ok", []).append(rep(z["ok"]))
            cols.setdefault("interp_layer", []).append(np.full(B * len(tgt), L))
            cols.setdefault("target_index", []).append(np.tile(tgt, B))
            for s in STAT_NAMES:
                cols.setdefault(s, []).append(z[f"stat_{s}"][:, L + 1:].reshape(-1))
    table = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    if not names:
        table = {k: np.zeros(0) for k in ("pair_index", "line", "ok", "interp_layer",
                                          "target_index") + STAT_NAMES}
    ti = table["target_index"].astype(int)
    table["target"] = np.array([labels[t] for t in ti], dtype=object)
    table["depth"] = np.where(ti < n_layer, ti - table["interp_layer"], -1)  # -1: logits
    table["_manifest"] = manifest
    table["_shards"] = len(names)
    return table


def _q(v, q):
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if v.size else float("nan")


def _corr(x, y):
    m = np.isfinite(x) & np.isfinite(y)
    if m.sum() < 3 or np.std(x[m]) == 0 or np.std(y[m]) == 0:
        return float("nan")
    return float(np.corrcoef(x[m], y[m])[0, 1])


def _frac(mask, valid):
    return float(mask[valid].mean()) if valid.any() else float("nan")


SHARPNESS = ("S_r_grid", "S_r_ref", "S_d_grid", "S_d_ref")
SUMMARY_COLUMNS = (
    "interp_layer", "target", "depth", "n", "n_failed", "n_expected", "plateau_frac",
    *(f"{s}_{q}" for s in SHARPNESS for q in ("median", "q25", "q75")),
    "alpha_ref_median", "alpha_ref_q25", "alpha_ref_q75", "width_median", "kl_boundary_ref_median",
    "jac_corr", "jac_within_step", "jac_within_step_logits", "spline_corr", "spline_within_step",
    "S_r_ref_median_plateau", "S_r_ref_median_nonplateau", "jac_within_step_plateau",
    "jac_within_step_nonplateau")


def summarize(table) -> List[dict]:
    """One summary row per (interpolation layer, target) over pairs with ok results: every
    (L, target) of the configuration gets a row, also when no pair succeeded there (n = 0)."""
    manifest = table["_manifest"]
    cfg = manifest["config"]
    step = 1.0 / (cfg["spec"]["n_steps"] - 1)
    n_layer = cfg.get("model", {}).get("config", {}).get("n_layer")
    n_expected = cfg.get("pairs", {}).get("n")
    labels = runner.target_labels(n_layer) if n_layer else None
    ok = table["ok"].astype(bool)
    rows = []
    # logits boundary of each (pair, L), for the *_logits comparisons
    logit = ok & (table["target"] == "logits")
    key = lambda p, L: (int(p), int(L))
    logit_alpha = {key(p, L): a for p, L, a in zip(table["pair_index"][logit],
                                                     table["interp_layer"][logit],
                                                     table["alpha_grid"][logit])}
    if n_layer:
        units = [(L, t) for L in cfg["spec"]["layers"] for t in range(L + 1, n_layer + 1)]
    else:  # a hand-made table (tests)
        units = sorted({(int(L), int(t)) for L, t in zip(table["interp_layer"],
                                                          table["target_index"])})
    for L, t in units:
        here = (table["interp_layer"] == L) & (table["target_index"] == t)
        m = ok & here
        g = {k: np.asarray(table[k][m], np.float64) for k in STAT_NAMES}
        la = np.array([logit_alpha.get(key(p, L), np.nan) for p in table["pair_index"][m]])
        plat = g["plateau"] > 0.5
        jv = np.isfinite(g["jac_peak_alpha"]) & np.isfinite(g["alpha_grid"])
        jw = np.abs(g["jac_peak_alpha"] - g["alpha_grid"]) <= step * (1 + 1e-9)
        jl = np.abs(g["jac_peak_alpha"] - la) <= step * (1 + 1e-9)
        sv = np.isfinite(g["spline_peak_alpha"]) & np.isfinite(g["alpha_grid"])
        sw = np.abs(g["spline_peak_alpha"] - g["alpha_grid"]) <= step * (1 + 1e-9)
        if labels is not None:
            target = labels[t]
            depth = "logits" if t == n_layer else t - L
        else:
            target = table["target"][here][0]
            depth = "logits" if target == "logits" else int(table["depth"][here][0])
        rows.append({
            "interp_layer": L, "target": target, "depth": depth, "n": int(m.sum()),
            "n_failed": int((here & ~ok).sum()),
            "n_expected": n_expected if n_expected is not None else "",
            "plateau_frac": float(plat.mean()) if m.any() else float("nan"),
            **{f"{s}_{n}": _q(g[s], q) for s in SHARPNESS + ("alpha_ref",)
               for n, q in (("median", .5), ("q25", .25), ("q75", .75))},
            "width_median": _q(g["width"], .5),
            "kl_boundary_ref_median": _q(g["kl_boundary_ref"], .5),
            "jac_corr": _corr(g["jac_peak_alpha"], g["alpha_grid"]),
            "jac_within_step": _frac(jw, jv),
            "jac_within_step_logits": _frac(jl, np.isfinite(g["jac_peak_alpha"]) & np.isfinite(la)),
            "spline_corr": _corr(g["spline_peak_alpha"], g["alpha_grid"]),
            "spline_within_step": _frac(sw, sv),
            "S_r_ref_median_plateau": _q(g["S_r_ref"][plat], .5),
            "S_r_ref_median_nonplateau": _q(g["S_r_ref"][~plat], .5),
            "jac_within_step_plateau": _frac(jw, jv & plat),
            "jac_within_step_nonplateau": _frac(jw, jv & ~plat),
        })
    return rows


def completeness(table) -> dict:
    """Shards and (pair, layer) results present vs expected, failed results, rejected rows."""
    manifest = table["_manifest"]
    cfg = manifest["config"]
    n_pairs, layers = cfg["pairs"]["n"], cfg["spec"]["layers"]
    n_batches = -(-n_pairs // cfg["batch_size"]) if n_pairs else 0
    present = set(zip(table["pair_index"].tolist(), table["interp_layer"].tolist()))
    failed = set(zip(table["pair_index"][~table["ok"].astype(bool)].tolist(),
                     table["interp_layer"][~table["ok"].astype(bool)].tolist()))
    return {"shards": int(table["_shards"]), "shards_expected": n_batches * len(layers),
            "results": len(present), "results_expected": n_pairs * len(layers),
            "failed": len(failed), "rejected_rows": manifest.get("rejected_rows"),
            "complete": len(present) == n_pairs * len(layers)}


def _fmt(v):
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def summary_markdown(rows: List[dict], manifest: dict, done: dict) -> str:
    cfg = manifest["config"]
    spec = cfg["spec"]
    rejected = done["rejected_rows"]
    out = ["# Plateau sweep summary\n"]
    if not done["complete"]:
        out.append(f"**Incomplete sweep: {done['shards']} of {done['shards_expected']} shards, "
                   f"{done['results']} of {done['results_expected']} (pair, layer) results "
                   "present. The numbers below cover only those; rerun the sweep command to "
                   "finish it.**\n")
    if done["results"] and done["failed"] == done["results"]:
        out.append(f"**Every pair failed** ({done['failed']} (pair, layer) results; reasons in "
                   "errors.jsonl): no statistics.\n")
    out.append(
        f"Model `{cfg['model']['name']}`, {cfg['pairs']['n']} pairs"
        f"{'' if rejected is None else f' ({rejected} input rows rejected)'}, "
        f"{done['failed']} of {done['results']} (pair, layer) results failed; interpolation at "
        f"`resid_post` of layers {spec['layers']}, {spec['n_steps']} steps ({spec['path']}), "
        f"recording `{spec['component']}`, refinement tol {spec['tol']}, sharpness width "
        f"w = {spec['sharpness_width']}; plateau = width >= {cfg['plateau_width']} (r within "
        f"{cfg['plateau_tol']} of an endpoint). Config hash `{manifest['config_hash'][:12]}`.\n")
    out.append("S_r is the sharpness of the relative distance r = |y-y0|/(|y-y0|+|y-y1|) (the "
               "study's curves), S_d that of the distance curve d = |y-y0|/|y1-y0| (the "
               "stable-regions work's); they are different numbers. grid: max slope between grid "
               "points; refined: slope over the width-w window around the boundary alpha* "
               "(located on r) after bisection to tol.\n")
    out += ["| L | target | depth | n (failed) | plateau | S_r grid median [IQR] | "
            "S_r refined median [IQR] | S_d grid median [IQR] | S_d refined median [IQR] | "
            "alpha* median [IQR] | jac peak r | jac within 1 step (plateau / non) | "
            "spline within 1 step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    iqr = lambda r, s: f"{_fmt(r[s + '_median'])} [{_fmt(r[s + '_q25'])}, {_fmt(r[s + '_q75'])}]"
    for r in rows:
        out.append(
            f"| {r['interp_layer']} | {r['target']} | {r['depth']} | {r['n']} ({r['n_failed']}) | "
            f"{_fmt(r['plateau_frac'])} | {iqr(r, 'S_r_grid')} | {iqr(r, 'S_r_ref')} | "
            f"{iqr(r, 'S_d_grid')} | {iqr(r, 'S_d_ref')} | {iqr(r, 'alpha_ref')} | "
            f"{_fmt(r['jac_corr'])} | {_fmt(r['jac_within_step'])} "
            f"({_fmt(r['jac_within_step_plateau'])} / {_fmt(r['jac_within_step_nonplateau'])}) | "
            f"{_fmt(r['spline_within_step'])} |")
    return "\n".join(out) + "\n"


def write_report(output_dir: str, figures: bool = True) -> Dict[str, str]:
    """Writes the report into ``output_dir/report`` (published atomically: readers see the old
    report or the new one); returns ``{name: path}`` and ``"complete": "yes"/"no"``."""
    table = load_table(output_dir)  # before anything is written: fails on a non-sweep directory
    manifest = table["_manifest"]
    done = completeness(table)
    rows = summarize(table)
    pub = files.Publication(output_dir, "report", {"config_hash": manifest["config_hash"],
                                                   "figures": figures}, overwrite=True)
    written = {}
    with pub.staging() as stage:
        cols = ["pair_index", "line", "ok", "interp_layer", "target", "depth"] + list(STAT_NAMES)
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        order = np.lexsort((table["target_index"], table["interp_layer"], table["pair_index"]))
        for i in order:
            w.writerow([_fmt(table[c][i].item()) if hasattr(table[c][i], "item") else table[c][i]
                        for c in cols])
        files.atomic_write_bytes(os.path.join(stage, "stats.csv"), buf.getvalue().encode())
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in SUMMARY_COLUMNS})
        files.atomic_write_bytes(os.path.join(stage, "summary.csv"), buf.getvalue().encode())
        files.atomic_write_bytes(os.path.join(stage, "summary.md"),
                                 summary_markdown(rows, manifest, done).encode())
        names = ["stats.csv", "summary.csv", "summary.md"]
        if figures and rows:
            from plateau_jax.plotting import sweep as plotting

            names += [os.path.basename(p) for p in plotting.save_all(
                table, rows, stage, model_name=manifest["config"]["model"]["name"],
                n_layer=manifest["config"]["model"]["config"]["n_layer"])]
        link = pub.commit(extra={"completeness": done})
    written = {n: os.path.join(link, n) for n in names}
    written["complete"] = "yes" if done["complete"] else (
        f"no: {done['results']} of {done['results_expected']} (pair, layer) results")
    return written
