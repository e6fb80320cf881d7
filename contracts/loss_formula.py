"""Loss formulas: a plain loss name or a weighted sum of them, as the spec's `loss` field spells it.

`focal`, `0.6*focal+0.4*f1` and `0.6 * Focal + 0.4 * F1` are the same kinds of text; the spec
stores the canonical spelling (lower case, no spaces, a lone weight-1 term as its bare name) so
two spellings of one loss get one spec hash. The canonical spelling parses back to the same
terms, bit for bit. Torch-free: the publisher validates with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

LossTerm = tuple[float, str]  # (weight, loss name)

# A weight's range: beyond it the weighted losses (and their gradients, in float16 under AMP)
# overflow or vanish, which no real weighting wants.
MIN_WEIGHT = 1e-6
MAX_WEIGHT = 1e6
# Terms are joined by "+", except the "+" of an exponent (1e+20).
TERM_SEPARATOR = re.compile(r"(?<![0-9.][eE])\+")


def parse_loss(text: str, canonical_name: Callable[[str], str]) -> list[LossTerm]:
    """'0.6*focal+0.4*f1' -> [(0.6, 'focal'), (0.4, 'f1')]; ValueError naming the bad part.

    `canonical_name` turns one name into its canonical form or raises ValueError (unknown name).
    """
    if not text.strip():
        raise ValueError("loss is empty; give a name (e.g. focal) or a weighted sum like 0.6*focal+0.4*f1")
    terms: list[LossTerm] = []
    for part in TERM_SEPARATOR.split(text.replace(" ", "")):
        if not part:
            raise ValueError(f"loss {text!r} has an empty term; write it like 0.6*focal+0.4*f1")
        weight_text, _, name = part.rpartition("*")
        weight = 1.0
        if weight_text:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(
                    f"loss term {part!r}: {weight_text!r} is not a number; write it like 0.6*focal"
                ) from None
            if not math.isfinite(weight) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise ValueError(
                    f"loss term {part!r}: the weight must be a positive number from {format_weight(MIN_WEIGHT)} "
                    f"to {format_weight(MAX_WEIGHT)} "
                    "(only the weights' ratios matter: scale them down, e.g. 0.6*focal+0.4*f1)"
                )
        canonical = canonical_name(name)
        if any(existing == canonical for _, existing in terms):
            raise ValueError(f"loss {text!r} names {canonical} twice; give each loss once with its weight")
        terms.append((weight, canonical))
    return terms


def format_weight(weight: float) -> str:
    """The shortest text that parses back to exactly `weight`, without an exponent's '+' (1e+20 -> 1e20)."""
    text = repr(float(weight)).replace("e+", "e")
    return text.removesuffix(".0")


def format_loss(terms: list[LossTerm]) -> str:
    """The canonical spelling: 'focal' for one weight-1 term, else '0.6*focal+0.4*f1'."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    return "+".join(f"{format_weight(weight)}*{name}" for weight, name in terms)
