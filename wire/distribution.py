"""What HQ and the gateway both do with a rule set's layer parts: order them,
check their headers against the part names, merge and validate.

One definition for both sides: HQ runs it before signing (a rule set that
would not merge is never published), the gateway again before applying
(nothing from the wire is trusted to be well-formed, signed or not).
"""

from __future__ import annotations

from wire import ruleset as _rs
from wire.ruleset import RulesetError

LEVELS = _rs.LEVELS


def layer_part_name(level: str, ident: str) -> str:
    return "layer:chain" if level == "chain" else f"layer:{level}:{ident}"


def parse_layer_name(name: str) -> tuple[str, str | None]:
    """'layer:region:east' -> ('region', 'east'); 'layer:chain' -> ('chain', None)."""
    bits = name.split(":", 2)
    if bits[0] != "layer" or bits[1] not in LEVELS:
        raise RulesetError(f"{name}: not a layer part")
    return bits[1], (bits[2] if len(bits) == 3 else None)


def check_layer_header(doc: dict, name: str) -> None:
    """A layer's own ``[layer]`` header must say what its part name says."""
    level, ident = parse_layer_name(name)
    head = doc.get("layer")
    if not isinstance(head, dict) or head.get("level") != level:
        raise RulesetError(f"part {name}: its [layer] header says {head!r}, not level {level!r}")
    if ident is not None and head.get("id") != ident:
        raise RulesetError(f"part {name}: its [layer] header names id {head.get('id')!r}, not {ident!r}")


def effective_rules(layers: list[dict], *, store: str | None = None, region: str | None = None) -> dict:
    """The effective rule set of chain, region and store layers (in that
    order): merged (wire.ruleset.merge_layers), validated, defaults filled in.
    RulesetError names the layer and field of anything wrong, contradictory
    layers included."""
    return _rs.with_defaults(_rs.effective_ruleset(layers, store=store, region=region))
