"""The one seed rule: every random draw is seeded by the integers that name it (run seed, batch, image, ...), so a
draw depends on nothing else (not on what was drawn before it; an image's draws, LoRA dropout masks included, not
on the process that trains it)."""
from __future__ import annotations

VALIDATION = 0x7A11D  # validation's draws lead with this, apart from training's (which lead with the run seed)


def mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (FNV-1a over their 64-bit values)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
