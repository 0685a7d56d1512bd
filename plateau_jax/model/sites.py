"""Activation-site names (TransformerLens legacy hook names): validation, order, shapes.

One meaning per word:

* a *site* is a full hook name: ``hook_embed``, ``hook_pos_embed``, ``ln_final.hook_normalized``
  or ``blocks.{layer}.{local}`` with ``local`` one of :data:`BLOCK_SITES` (``sites=`` arguments
  take these);
* a *component* is a per-layer name, short (``"resid_post"``, ``"mlp_pre"``, ...:
  :data:`SHORT_NAMES`) or local (``"mlp.hook_pre"``); ``site_name(layer, component)`` makes a
  site of it and :func:`local_name` its local form;
* a *sublayer* is ``"attn"`` or ``"mlp"`` (:data:`SUBLAYERS`), whose output
  ``hook_{sublayer}_out`` can be frozen;
* an *entry site* is a residual component (:data:`RESIDUAL_SITES`) of a layer where a vector
  enters the model (the ``site=`` argument of continuations, interpolation runs and Jacobian
  sweeps), numbered in half-blocks (:func:`entry_index`) so that it can be a runtime value.
"""

from __future__ import annotations

import difflib
import re
from typing import Dict, Iterable, List, Sequence, Tuple

from plateau_jax.model.config import ModelConfig

# Local names in execution order, each with the half-block that computes it: "attn" (ln1 ...
# hook_attn_out), "mlp" (ln2 ... hook_mlp_out), or a residual site between halves.
_BLOCK = (
    ("hook_resid_pre", "resid"), ("ln1.hook_normalized", "attn"), ("attn.hook_q", "attn"),
    ("attn.hook_k", "attn"), ("attn.hook_v", "attn"), ("attn.hook_pattern", "attn"),
    ("attn.hook_z", "attn"), ("hook_attn_out", "attn"), ("hook_resid_mid", "resid"),
    ("ln2.hook_normalized", "mlp"), ("mlp.hook_pre", "mlp"), ("mlp.hook_pre_linear", "mlp"),
    ("mlp.hook_post", "mlp"), ("hook_mlp_out", "mlp"), ("hook_resid_post", "resid"),
)
BLOCK_SITES = tuple(name for name, _ in _BLOCK)
HALF = dict(_BLOCK)
GLOBAL_SITES_IN = ("hook_embed", "hook_pos_embed")
GLOBAL_SITES_OUT = ("ln_final.hook_normalized",)
# Entry sites: the residual components, in half-block order (see entry_index).
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")
# Per-layer components with one vector per position (d_model or d_mlp wide), in execution order:
# what interpolation runs record by default and the sweep measures.
VECTOR_COMPONENTS = ("attn_out", "resid_mid", "mlp_pre", "mlp_post", "mlp_out", "resid_post")
SUBLAYERS = ("attn", "mlp")
# Short names accepted wherever a per-layer component is asked for.
SHORT_NAMES = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
               "resid_post": "hook_resid_post", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post",
               "mlp_pre_linear": "mlp.hook_pre_linear", "pattern": "attn.hook_pattern",
               "ln1": "ln1.hook_normalized", "ln2": "ln2.hook_normalized", "q": "attn.hook_q",
               "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z"}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class UnknownSiteError(KeyError):
    def __str__(self):  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


def local_name(component: str) -> str:
    """``"mlp_pre"`` -> ``"mlp.hook_pre"``; full local names pass through unchanged."""
    name = SHORT_NAMES.get(component, component)
    if name not in HALF:
        raise UnknownSiteError(
            f"Unknown block component {component!r}; use one of {sorted(SHORT_NAMES)} or a "
            f"TransformerLens local hook name ({', '.join(BLOCK_SITES)}).")
    return name


def site_name(layer: int, component: str) -> str:
    """``site_name(3, "resid_post") == "blocks.3.hook_resid_post"`` (short or local names)."""
    return f"blocks.{int(layer)}.{local_name(component)}"


def block_sites(config: ModelConfig) -> Tuple[str, ...]:
    """The local site names a block of this model has, in execution order."""
    out = []
    for name in BLOCK_SITES:
        if name == "hook_resid_mid" and not config.has_resid_mid:
            continue
        if name == "mlp.hook_pre_linear" and not config.gated_mlp:
            continue
        out.append(name)
    return tuple(out)


def mlp_input(config: ModelConfig) -> str:
    """Short name of the residual site the MLP reads (through ln2): "resid_mid", or
    "resid_pre" with a parallel residual (attention and MLP both read the block's input).
    MLP Jacobians and spline densities are taken with respect to it."""
    return "resid_mid" if config.has_resid_mid else "resid_pre"


def all_sites(config: ModelConfig) -> Tuple[str, ...]:
    """Every valid site name of a model, in execution order."""
    head = list(GLOBAL_SITES_IN if config.positional == "learned" else GLOBAL_SITES_IN[:1])
    local = block_sites(config)
    body = [f"blocks.{i}.{n}" for i in range(config.n_layer) for n in local]
    return tuple(head + body + list(GLOBAL_SITES_OUT))


def parse_site(name: str, config: ModelConfig) -> Tuple[int, str]:
    """``(layer, local name)``, layer -1 for global sites; raises :class:`UnknownSiteError`
    with the closest valid name."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in block_sites(config):
        layer = int(m.group(1))
        if layer >= config.n_layer:
            raise UnknownSiteError(
                f"Site {name!r}: layer {layer} is out of range; this model has layers "
                f"0..{config.n_layer - 1}.")
        return layer, m.group(2)
    if name in all_sites(config) and not m:
        return -1, name
    if m and m.group(2) == "hook_resid_mid":
        raise UnknownSiteError(
            f"Site {name!r}: this model has a parallel residual (attention and MLP both read "
            "resid_pre), so there is no resid_mid.")
    close = difflib.get_close_matches(name, all_sites(config), n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownSiteError(
        f"Unknown activation site {name!r}.{hint} Valid names are TransformerLens legacy hook "
        f"names: {', '.join(GLOBAL_SITES_IN)}, blocks.{{i}}.<{'|'.join(block_sites(config))}>, "
        f"{GLOBAL_SITES_OUT[0]}.")


def check_layer(layer, config: ModelConfig, what: str = "layer") -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < config.n_layer:
        raise ValueError(
            f"{what}={layer!r} is out of range: this model has layers 0..{config.n_layer - 1}.")
    return int(layer)


# ----------------------------------------------------------------------------- order

def _half_index(layer: int, site: str, what: str = "entry") -> int:
    if site not in RESIDUAL_SITES:
        raise ValueError(f"{what} site {site!r}: expected one of {RESIDUAL_SITES} (a residual "
                         "component, where a vector can enter the model).")
    return 2 * int(layer) + RESIDUAL_SITES.index(site)


def entry_index(layer: int, site: str, config: ModelConfig, what: str = "entry") -> int:
    """Half-block index of an entry point: ``2 layer`` for resid_pre, ``2 layer + 1`` for
    resid_mid, ``2 layer + 2`` for resid_post (the next layer's resid_pre). Blocks whose
    attention half has index >= the entry run; the rest are skipped. ``what`` names the entry
    in error messages (e.g. "interpolation")."""
    check_layer(layer, config, what="layer" if what == "entry" else f"{what} layer")
    index = _half_index(layer, site, what)
    if site == "resid_mid" and not config.has_resid_mid:
        raise ValueError("this model has a parallel residual: there is no resid_mid to enter at; "
                         "use resid_pre or resid_post.")
    return index


def _sequential_index(layer: int, local: str) -> int:
    """:func:`site_index` of a block site in a block whose halves run one after the other."""
    half = HALF[local]
    if half == "resid":
        return 2 * layer + {"hook_resid_pre": 0, "hook_resid_mid": 1, "hook_resid_post": 2}[local]
    return 2 * layer + (1 if half == "mlp" else 0)


def site_index(layer: int, local: str, config: ModelConfig) -> int:
    """The half-block index at which a site is computed (comparable with :func:`entry_index`):
    a site can be recorded or patched by a call entering at ``e`` iff its index is >= ``e``."""
    if layer < 0:
        return -1 if local in GLOBAL_SITES_IN else 2 * config.n_layer + 1
    if config.parallel_residual and HALF[local] == "mlp":
        return 2 * layer  # the MLP reads resid_pre, beside the attention
    return _sequential_index(layer, local)


def upstream_of_entry(layer: int, component: str, entry_layer: int, entry_site: str) -> bool:
    """Whether ``component`` of ``layer`` is computed before the entry site
    ``blocks.{entry_layer}.hook_{entry_site}``, so that a continuation entering there never
    computes it (earlier layers, and resid_pre and the attention half of a layer entered at
    resid_mid). The rule of :func:`site_index` ``<`` :func:`entry_index`; no config is needed:
    with a parallel residual there is no resid_mid entry, and the MLP's place beside or after
    the attention does not matter for the other entries."""
    return (_sequential_index(layer, local_name(component))
            < _half_index(entry_layer, entry_site))


def first_block(entry):
    """First block that (partly) runs when entering at half-block ``entry``: ``entry // 2``
    (ints and traced values alike)."""
    return entry // 2


def first_layer_after(layer: int, site: str) -> int:
    """First block that runs after entering at ``blocks.{layer}.hook_{site}``: ``layer + 1``
    for resid_post, ``layer`` for resid_pre and resid_mid."""
    return first_block(_half_index(layer, site))


def group_by_local(names: Iterable[str], config: ModelConfig) -> Tuple[Dict[str, List[int]], List[str]]:
    """Splits full site names into ``{local: sorted layers}`` and the global names (sorted);
    every name is validated."""
    per_local: Dict[str, set] = {}
    glob = set()
    for n in names:
        layer, local = parse_site(n, config)
        if layer < 0:
            glob.add(local)
        else:
            per_local.setdefault(local, set()).add(layer)
    return {k: sorted(v) for k, v in sorted(per_local.items())}, sorted(glob)


def site_shape(local: str, config: ModelConfig, batch: int, new: int, keys: int) -> Tuple[int, ...]:
    """Shape of a block site's value for ``batch`` rows of ``new`` positions attending to
    ``keys`` keys (``attn.hook_pattern`` only)."""
    if local == "attn.hook_pattern":
        return (batch, config.n_head, new, keys)
    if local in ("attn.hook_q", "attn.hook_z"):
        return (batch, new, config.n_head, config.d_head)
    if local in ("attn.hook_k", "attn.hook_v"):
        return (batch, new, config.n_kv_head, config.d_head)
    if local.startswith("mlp.hook_"):
        return (batch, new, config.d_mlp)
    return (batch, new, config.d_model)


def position_axis(local: str) -> int:
    """Axis of the new positions in a site's value (see :func:`site_shape`)."""
    return 2 if local == "attn.hook_pattern" else 1


def validate_sites(names: Sequence[str], config: ModelConfig) -> Tuple[str, ...]:
    """Checks every name (see :func:`parse_site`) and returns them as a sorted tuple."""
    names = tuple(sorted(set(names)))
    for n in names:
        parse_site(n, config)
    return names
