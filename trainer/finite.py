"""The one rule for the numbers a user gives outside the config tree: adapter weights (blend, bake, generate, the
Generate tab's slots and grid rows) and guidance. NaN or infinity passes float() and every comparison quietly,
then writes a NaN adapter or draws a black or flat image; refused here, by name, before anything is loaded or
written. (Config fields are checked by `config.validate`.) Stdlib only: the CLI checks its arguments before torch
loads.
"""
from __future__ import annotations

import math

from .config import MAX_SEED
from .errors import UserError

WEIGHT_HINT = "such as 0.8 (1 = as trained, 0 = off, negative = the opposite)"
GUIDANCE_HINT = "such as 7.5 (1 = no guidance)"


class NotFiniteError(UserError, ValueError):
    """A weight or guidance that is not a finite number; the message names it and gives an example."""


def finite_number(value, name: str, hint: str = "") -> float:
    """`value` as a float; NaN, infinity or something that is not a number is refused naming `name`."""
    example = f" {hint}" if hint else ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NotFiniteError(f"{name} is {value!r}, which is not a number; give a finite number{example}") from None
    if not math.isfinite(number):
        raise NotFiniteError(f"{name} is {value}, which is not a finite number (it would write NaN weights or draw "
                             f"a black image); give a finite number{example}")
    return number


def adapter_weight(value, label: str) -> float:
    """An adapter's weight in a blend, a bake or a generation; `label` names the adapter (a file name)."""
    return finite_number(value, f"the weight of {label}", WEIGHT_HINT)


def seed_value(value, name: str = "seed") -> int:
    """A generation's seed: a whole number from 0 to config.MAX_SEED (torch overflows on larger ones)."""
    number = finite_number(value, name, "such as 1234")
    if number != int(number) or not 0 <= number <= MAX_SEED:
        raise NotFiniteError(f"{name} is {value}; give a whole number from 0 to {MAX_SEED}")
    return int(number)


def guidance_scale(value, name: str = "guidance") -> float:
    """A classifier-free guidance scale; `name` is what the user set it with (--guidance, the Guidance slider)."""
    return finite_number(value, name, GUIDANCE_HINT)
