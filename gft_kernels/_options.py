"""The option values the library accepts, and the checks of plain option values.

One source for every list a caller or an integration needs (aggregation modes, backends)
and for the small value checks every entry point repeats, so that each error message is
written once.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from gft_kernels.backends import BACKENDS

__all__ = [
    "BACKENDS",
    "LOSS_AGG_MODES",
    "REDUCED_MODES",
    "SEQ_MODES",
    "check_choice",
    "check_int",
    "check_real",
]

LOSS_AGG_MODES: Tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "sum",
    "none",
)
# Modes that reduce to a scalar (what a trainer back-propagates).
REDUCED_MODES: Tuple[str, ...] = tuple(m for m in LOSS_AGG_MODES if m != "none")
# Modes that need (B, T)-shaped tokens.
SEQ_MODES: Tuple[str, ...] = tuple(m for m in LOSS_AGG_MODES if m.startswith("seq-"))


def check_choice(name: str, value: object, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def check_int(
    name: str, value: object, *, minimum: int = 1, allow_none: bool = False
) -> Optional[int]:
    """An int ``>= minimum`` (bools refused), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if allow_none:
        kind = "None or " + kind
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected {kind}, got {value}")
    return value


def check_real(
    name: str, value: object, *, minimum: float, inclusive: bool, allow_inf: bool = False
) -> float:
    """A real number (a 1-element tensor is read) ``>= minimum`` or ``> minimum``.

    Written with comparisons only (no ``math.isnan``, no ``float()``): under
    ``torch.compile`` a Python number that changes between calls becomes symbolic, and a
    comparison on it is a range guard, where ``math.isnan`` cannot be traced and
    ``float()`` would pin the value (one recompile per value).
    """
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"{name}: expected a number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = torch.sym_float(value)
    if value != value or (not allow_inf and not -math.inf < value < math.inf):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name}: expected a value {bound}, got {value}")
    return value
