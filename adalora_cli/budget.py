"""Parameter budgets: parsing "0.3M", and the accounting every method's rank plan relies on.

A budget counts trainable adapter parameters at the end of training, task head excluded.
A rank-1 component of a d_out x d_in matrix costs d_in + d_out (LoRA, DyLoRA, PRILoRA) or
d_in + d_out + 1 (AdaLoRA, whose triplet also holds a singular value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adalora_cli.errors import UserError

_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmM]?)\s*$")
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000}


def parse_budget(text: str | int | float | None) -> int | None:
    """Parse `300000`, `300k`, `0.3M` or `1.27M` into a positive parameter count."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise UserError(f"budget {text!r} is not a parameter count; write e.g. 300000, 300k or 0.3M")
    if isinstance(text, (int, float)):
        text = repr(text)
    match = _BUDGET_RE.match(str(text))
    if not match:
        raise UserError(f"budget {text!r} is not a parameter count; write e.g. 300000, 300k or 0.3M")
    value = round(float(match.group(1)) * _SUFFIX[match.group(2).lower()])
    if value <= 0:
        raise UserError(f"budget {text!r} must be a positive parameter count; write e.g. 300000, 300k or 0.3M")
    return value


def format_count(n: int) -> str:
    """Short human form of a parameter count: 290304 -> '290.3k'."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


@dataclass(frozen=True)
class Target:
    """A linear layer chosen for adaptation, described by what rank planning needs."""

    name: str
    d_in: int
    d_out: int
    layer: int  # transformer block index, 0-based
    kind: str  # Wq, Wk, Wv, Wo, Wf1, Wf2 (or the module's own name outside the presets)


def component_cost(target: Target, extra: int = 0) -> int:
    """Parameters of one rank-1 component: a column of B and a row of A (plus `extra`, e.g. AdaLoRA's lambda)."""
    return target.d_in + target.d_out + extra


def full_rank_capacity(targets: list[Target], extra: int = 0) -> int:
    """Adapter parameters the targets hold with every matrix at full rank, min(d_in, d_out): a rank beyond it adds
    parameters but no expressiveness, so no budget above this can be spent usefully."""
    return sum(min(t.d_in, t.d_out) * component_cost(t, extra) for t in targets)


def check_capacity(targets: list[Target], budget: int, extra: int = 0) -> None:
    """Refuse a budget above `full_rank_capacity`: on a small model it would silently train most of the model."""
    most = full_rank_capacity(targets, extra)
    if budget > most:
        raise UserError(
            f"budget {budget:,} is more than the {len(targets)} adapted matrices can hold ({most:,} parameters with "
            f"every matrix at full rank); lower --budget to at most {most:,}, or adapt more matrices "
            "(--set <method>.target_modules=...) or train every weight (--method full)"
        )


def largest_uniform_rank(targets: list[Target], budget: int, extra: int = 0) -> int:
    """The largest rank r such that every target at rank r together costs at most `budget`.

    Raises a UserError when even rank 1 everywhere exceeds the budget, or the budget exceeds what the targets hold.
    """
    check_capacity(targets, budget, extra)
    per_rank = sum(component_cost(t, extra) for t in targets)
    rank = budget // per_rank
    if rank < 1:
        raise UserError(
            f"budget {budget:,} is below one rank per adapted matrix ({per_rank:,} parameters for "
            f"{len(targets)} matrices); raise --budget to at least {format_count(per_rank)}"
        )
    return rank
