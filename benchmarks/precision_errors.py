r"""What each ``matmul_precision`` costs in accuracy: logits, a relative-distance curve and MLP
Jacobian norms of a random GPT-2 at every precision, against ``"highest"`` (exact float32) and
against transformers' PyTorch GPT-2 in float32 with TF32 off (the study's reference numerics).

    python benchmarks/precision_errors.py --size=gpt2 --n_layer=12 [--json_out=FILE]

On CPUs XLA computes float32 products in float32 whatever the setting, so every row reads 0
there; on NVIDIA GPUs "default"/"tensorfloat32" use TF32 tensor cores and "bfloat16" one bf16 pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import plateau_jax as pj  # noqa: E402
from plateau_jax import testing  # noqa: E402


def _torch_logits(directory, ids):
    """Logits of transformers' PyTorch GPT-2 on the same weights, float32, TF32 off."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval().to(device)
    with torch.no_grad():
        return hf(torch.tensor(ids, device=device)).logits.float().cpu().numpy()


def measure(model, ids, directory=None):
    """``{precision: {logits, r, mlp_fro}: max abs / relative errors}`` against "highest"."""
    cfg = model.config
    cache = pj.run_prefix(model, ids[0, :-2])
    ends = pj.endpoint_activations(model, cache, ids[0, -2:], layers=[0])[0]
    x = pj.interpolate(ends[0], ends[1], pj.alpha_grid(50))

    def numbers(m):
        logits, _ = pj.forward(m, ids)
        run = pj.interpolation_run(m, cache, ends[0], ends[1], 0, pj.alpha_grid(50),
                                   components=("resid_post",))
        jac = pj.jacobian_sweep(m, cache, x, 0, families=("mlp",), mlp_method="gram",
                                cumulative=False)
        return dict(logits=np.asarray(logits, np.float64),
                    r=pj.metrics.relative_distance(run.logits),
                    mlp_fro=np.asarray(jac["mlp_fro"], np.float64))

    ref = numbers(model)
    table = {}
    for name in pj.MATMUL_PRECISIONS:
        got = numbers(model.with_precision(name))
        table[name] = {k: dict(max_abs=float(np.abs(got[k] - ref[k]).max()),
                               max_rel=float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()))
                       for k in ref}
    if directory is not None:
        torch_logits = _torch_logits(directory, ids)
        if torch_logits is not None:
            table["highest vs PyTorch float32 (TF32 off)"] = {"logits": dict(
                max_abs=float(np.abs(torch_logits - ref["logits"]).max()),
                max_rel=float(np.abs(torch_logits - ref["logits"]).max()
                              / np.abs(torch_logits).max()))}
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="gpt2", help="GPT-2 preset for the shapes.")
    p.add_argument("--n_layer", type=int, default=12, help="Blocks (fewer is faster).")
    p.add_argument("--json_out", default=None)
    args = p.parse_args()
    cfg = pj.ModelConfig.preset(args.size, n_layer=args.n_layer)
    with tempfile.TemporaryDirectory() as d:
        model = testing.make_checkpoint(d, cfg, tokenizer=pj.gpt2_tokenizer())
        ids = model.to_tokens("The house was big and the garden was large, the house was in")[None]
        table = measure(model, ids, d)
    print(f"# {args.size} x {args.n_layer} layers, random weights; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; errors against matmul_precision='highest'")
    print(f"{'precision':>40} {'logits max rel':>15} {'r(alpha) max abs':>17} {'MLP |J|_F max rel':>18}")
    for name, row in table.items():
        cells = [f"{row[k]['max_rel' if k != 'r' else 'max_abs']:.2e}" if k in row else "-"
                 for k in ("logits", "r", "mlp_fro")]
        print(f"{name:>40} {cells[0]:>15} {cells[1]:>17} {cells[2]:>18}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
