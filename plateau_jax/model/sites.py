"""Activation-site names (TransformerLens legacy hook names) and their validation."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Tuple

from plateau_jax.model.config import GPT2Config

BLOCK_SITES = (
    "hook_resid_pre", "ln1.hook_normalized", "attn.hook_pattern", "hook_attn_out",
    "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post",
)
GLOBAL_SITES_IN = ("hook_embed", "hook_pos_embed")
GLOBAL_SITES_OUT = ("ln_final.hook_normalized",)
# Order of sites inside a block: a continuation starting at one cannot record earlier ones.
_BLOCK_ORDER = {name: i for i, name in enumerate(BLOCK_SITES)}
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class UnknownSiteError(KeyError):
    def __str__(self):  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


def site(layer: int, name: str) -> str:
    """``site(3, "resid_post") == "blocks.3.hook_resid_post"``; accepts the short or hook form."""
    name = name if name.startswith(("hook_", "ln1.", "ln2.", "attn.", "mlp.")) else "hook_" + name
    return f"blocks.{layer}.{name}"


def all_sites(config: GPT2Config) -> Tuple[str, ...]:
    """Every valid site name of a model, in execution order."""
    out = list(GLOBAL_SITES_IN)
    for i in range(config.n_layer):
        out += [f"blocks.{i}.{n}" for n in BLOCK_SITES]
    return tuple(out + list(GLOBAL_SITES_OUT))


def parse_site(name: str, config: GPT2Config):
    """Returns (layer or None, local name); raises UnknownSiteError with the closest valid name."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_ORDER:
        layer = int(m.group(1))
        if layer >= config.n_layer:
            raise UnknownSiteError(
                f"Site {name!r}: layer {layer} is out of range; this model has layers "
                f"0..{config.n_layer - 1}.")
        return layer, m.group(2)
    if name in GLOBAL_SITES_IN or name in GLOBAL_SITES_OUT:
        return None, name
    close = difflib.get_close_matches(name, all_sites(config), n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownSiteError(
        f"Unknown activation site {name!r}.{hint} Valid names are TransformerLens legacy hook "
        f"names: {', '.join(GLOBAL_SITES_IN)}, blocks.{{i}}.<{'|'.join(BLOCK_SITES)}>, "
        f"{GLOBAL_SITES_OUT[0]}.")


def validate_sites(names: Iterable[str], config: GPT2Config) -> Tuple[str, ...]:
    """Checks every name (see :func:`parse_site`) and returns them as a sorted tuple."""
    names = tuple(sorted(set(names)))
    for n in names:
        parse_site(n, config)
    return names


def site_position(name: str, config: GPT2Config) -> Tuple[int, int]:
    """A sortable (layer, order) key: where a site falls in the forward pass."""
    layer, local = parse_site(name, config)
    if layer is None:
        return (-1, 0) if local in GLOBAL_SITES_IN else (config.n_layer, 0)
    return layer, _BLOCK_ORDER[local]


def check_layer(layer: int, config: GPT2Config, what: str = "layer") -> int:
    if not isinstance(layer, (int,)) or isinstance(layer, bool) or not 0 <= layer < config.n_layer:
        raise ValueError(
            f"{what}={layer!r} is out of range: this model has layers 0..{config.n_layer - 1}.")
    return int(layer)
