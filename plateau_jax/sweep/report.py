"""Aggregation of a sweep directory: per-pair table, summary (Markdown + CSV), figures.

Outputs (under ``output_dir/report``)::

    stats.csv        one row per (pair, interpolation layer, target): every statistic
    summary.csv/.md  per (interpolation layer, target): sharpness median and IQR (grid and
                     refined), boundary location, plateau fraction, how well the Jacobian-norm
                     and spline-density peaks predict the boundary, plateau vs non-plateau split
    sharpness_by_depth.png, alpha_star_hist.png, jac_vs_boundary.png

"Predicts": ``|jac_peak_alpha - alpha*_grid| <= one grid step`` (``jac_within_step``) and the
Pearson correlation of the two over pairs (``jac_corr``); ``*_logits`` compares a layer's peak
with the logits' boundary of the same pair instead.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from typing import Dict, List

import numpy as np

from plateau_jax import files
from plateau_jax.sweep import runner
from plateau_jax.sweep.stats import STAT_NAMES


def load_table(output_dir: str) -> Dict[str, np.ndarray]:
    """Long table ``{column: [rows]}`` over every shard; rows for targets upstream of the
    interpolation layer are dropped. Also returns the manifest under key ``"_manifest"``."""
    with open(os.path.join(output_dir, runner.MANIFEST)) as f:
        manifest = json.load(f)
    h = manifest["config_hash"]
    n_layer = manifest["config"]["model"]["config"]["n_layer"]
    labels = runner.target_labels(n_layer)
    cols: Dict[str, List[np.ndarray]] = {}
    shard_dir = os.path.join(output_dir, "shards")
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".npz"))
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


SUMMARY_COLUMNS = (
    "interp_layer", "target", "depth", "n", "plateau_frac",
    "S_grid_median", "S_grid_q25", "S_grid_q75", "S_ref_median", "S_ref_q25", "S_ref_q75",
    "alpha_ref_median", "alpha_ref_q25", "alpha_ref_q75", "width_median", "kl_boundary_ref_median",
    "jac_corr", "jac_within_step", "jac_within_step_logits", "spline_corr", "spline_within_step",
    "S_ref_median_plateau", "S_ref_median_nonplateau", "jac_within_step_plateau",
    "jac_within_step_nonplateau")


def summarize(table) -> List[dict]:
    """One summary row per (interpolation layer, target) over pairs with ok results."""
    manifest = table["_manifest"]
    step = 1.0 / (manifest["config"]["spec"]["n_steps"] - 1)
    ok = table["ok"].astype(bool)
    rows = []
    # logits boundary of each (pair, L), for the *_logits comparisons
    logit = ok & (table["target"] == "logits")
    key = lambda p, L: (int(p), int(L))
    logit_alpha = {key(p, L): a for p, L, a in zip(table["pair_index"][logit],
                                                     table["interp_layer"][logit],
                                                     table["alpha_grid"][logit])}
    for L in sorted(set(table["interp_layer"].astype(int).tolist())):
        for t in sorted(set(table["target_index"][table["interp_layer"] == L].astype(int).tolist())):
            m = ok & (table["interp_layer"] == L) & (table["target_index"] == t)
            g = {k: np.asarray(table[k][m], np.float64) for k in STAT_NAMES}
            la = np.array([logit_alpha.get(key(p, L), np.nan) for p in table["pair_index"][m]])
            plat = g["plateau"] > 0.5
            jv = np.isfinite(g["jac_peak_alpha"]) & np.isfinite(g["alpha_grid"])
            jw = np.abs(g["jac_peak_alpha"] - g["alpha_grid"]) <= step * (1 + 1e-9)
            jl = np.abs(g["jac_peak_alpha"] - la) <= step * (1 + 1e-9)
            sv = np.isfinite(g["spline_peak_alpha"]) & np.isfinite(g["alpha_grid"])
            sw = np.abs(g["spline_peak_alpha"] - g["alpha_grid"]) <= step * (1 + 1e-9)
            depth = int(table["depth"][m][0]) if m.any() else -1
            rows.append({
                "interp_layer": L, "target": table["target"][m][0] if m.any() else str(t),
                "depth": depth if depth >= 0 else "logits", "n": int(m.sum()),
                "plateau_frac": float(plat.mean()) if m.any() else float("nan"),
                **{f"{s}_{n}": _q(g[s], q) for s in ("S_grid", "S_ref", "alpha_ref")
                   for n, q in (("median", .5), ("q25", .25), ("q75", .75))},
                "width_median": _q(g["width"], .5),
                "kl_boundary_ref_median": _q(g["kl_boundary_ref"], .5),
                "jac_corr": _corr(g["jac_peak_alpha"], g["alpha_grid"]),
                "jac_within_step": _frac(jw, jv),
                "jac_within_step_logits": _frac(jl, np.isfinite(g["jac_peak_alpha"]) & np.isfinite(la)),
                "spline_corr": _corr(g["spline_peak_alpha"], g["alpha_grid"]),
                "spline_within_step": _frac(sw, sv),
                "S_ref_median_plateau": _q(g["S_ref"][plat], .5),
                "S_ref_median_nonplateau": _q(g["S_ref"][~plat], .5),
                "jac_within_step_plateau": _frac(jw, jv & plat),
                "jac_within_step_nonplateau": _frac(jw, jv & ~plat),
            })
    return rows


def _fmt(v):
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def summary_markdown(rows: List[dict], manifest: dict, n_errors: int) -> str:
    cfg = manifest["config"]
    out = [f"# Plateau sweep summary\n",
           f"Model `{cfg['model']['name']}`, {cfg['pairs']['n']} pairs ({n_errors} rejected or "
           f"failed), interpolation at `resid_post` of layers {cfg['spec']['layers']}, "
           f"{cfg['spec']['n_steps']} steps ({cfg['spec']['path']}), recording "
           f"`{cfg['spec']['component']}`, refinement tol {cfg['spec']['tol']}; plateau = width >= "
           f"{cfg['plateau_width']} (r within {cfg['plateau_tol']} of an endpoint). Config hash "
           f"`{manifest['config_hash'][:12]}`.\n",
           "| L | target | depth | n | plateau | S grid median [IQR] | S refined median [IQR] | "
           "alpha* median [IQR] | jac peak r | jac within 1 step (plateau / non) | spline within 1 step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['interp_layer']} | {r['target']} | {r['depth']} | {r['n']} | "
            f"{_fmt(r['plateau_frac'])} | {_fmt(r['S_grid_median'])} [{_fmt(r['S_grid_q25'])}, "
            f"{_fmt(r['S_grid_q75'])}] | {_fmt(r['S_ref_median'])} [{_fmt(r['S_ref_q25'])}, "
            f"{_fmt(r['S_ref_q75'])}] | {_fmt(r['alpha_ref_median'])} [{_fmt(r['alpha_ref_q25'])}, "
            f"{_fmt(r['alpha_ref_q75'])}] | {_fmt(r['jac_corr'])} | {_fmt(r['jac_within_step'])} "
            f"({_fmt(r['jac_within_step_plateau'])} / {_fmt(r['jac_within_step_nonplateau'])}) | "
            f"{_fmt(r['spline_within_step'])} |")
    return "\n".join(out) + "\n"


def _figures(table, rows, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table["ok"].astype(bool)
    n_layer = table["_manifest"]["config"]["model"]["config"]["n_layer"]
    Ls = sorted({r["interp_layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    for L in Ls:
        rr = [r for r in rows if r["interp_layer"] == L]
        x = [n_layer if r["target"] == "logits" else int(r["target"]) for r in rr]
        for key, ls in (("S_ref", "-"), ("S_grid", "--")):
            med = [r[f"{key}_median"] for r in rr]
            line, = ax.plot(x, med, ls, marker="o", label=f"L={L} {key}")
            if key == "S_ref":
                ax.fill_between(x, [r[f"{key}_q25"] for r in rr], [r[f"{key}_q75"] for r in rr],
                                alpha=0.2, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"recording layer ({n_layer} = logits)")
    ax.set_ylabel("sharpness S (median, IQR shaded)")
    ax.legend(fontsize=7)
    files.atomic_savefig(fig, os.path.join(out_dir, "sharpness_by_depth.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for L in Ls:
        m = ok & (table["interp_layer"] == L) & (table["target"] == "logits")
        for key in ("alpha_ref", "alpha_grid"):
            v = table[key][m].astype(float)
            ax.hist(v[np.isfinite(v)], bins=50, range=(0, 1), histtype="step",
                    label=f"L={L} {key}")
    ax.set_xlabel("boundary alpha* (logits)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=7)
    files.atomic_savefig(fig, os.path.join(out_dir, "alpha_star_hist.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    m = ok & (table["target"] != "logits")
    sc = ax.scatter(table["alpha_grid"][m].astype(float), table["jac_peak_alpha"][m].astype(float),
                    c=table["depth"][m], s=4, cmap="viridis", alpha=0.5)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    fig.colorbar(sc, label="recording depth (layers after L)")
    ax.set_xlabel("boundary alpha* (grid)")
    ax.set_ylabel("MLP Jacobian-norm peak alpha")
    files.atomic_savefig(fig, os.path.join(out_dir, "jac_vs_boundary.png"), dpi=120)
    plt.close(fig)


def write_report(output_dir: str, figures: bool = True) -> Dict[str, str]:
    """Writes the report files; returns ``{name: path}``."""
    table = load_table(output_dir)
    manifest = table["_manifest"]
    out_dir = os.path.join(output_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    cols = ["pair_index", "line", "ok", "interp_layer", "target", "depth"] + list(STAT_NAMES)
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    order = np.lexsort((table["target_index"], table["interp_layer"], table["pair_index"]))
    for i in order:
        w.writerow([_fmt(table[c][i].item()) if hasattr(table[c][i], "item") else table[c][i]
                    for c in cols])
    paths["stats.csv"] = os.path.join(out_dir, "stats.csv")
    files.atomic_write_bytes(paths["stats.csv"], buf.getvalue().encode())
    rows = summarize(table)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r[k]) for k in SUMMARY_COLUMNS})
    paths["summary.csv"] = os.path.join(out_dir, "summary.csv")
    files.atomic_write_bytes(paths["summary.csv"], buf.getvalue().encode())
    err_path = os.path.join(output_dir, "errors.jsonl")
    n_err = sum(1 for _ in open(err_path)) if os.path.exists(err_path) else 0
    expected = manifest["config"]["pairs"]["n"] * len(manifest["config"]["spec"]["layers"])
    md = summary_markdown(rows, manifest, n_err)
    got = len(set(zip(table["pair_index"].tolist(), table["interp_layer"].tolist())))
    if got < expected:
        md += f"\n**Incomplete sweep**: {got} of {expected} (pair, layer) results present.\n"
    paths["summary.md"] = os.path.join(out_dir, "summary.md")
    files.atomic_write_bytes(paths["summary.md"], md.encode())
    if figures and rows:
        _figures(table, rows, out_dir)
        for n in ("sharpness_by_depth.png", "alpha_star_hist.png", "jac_vs_boundary.png"):
            paths[n] = os.path.join(out_dir, n)
    return paths
