"""The captioner's error. Stdlib only: the app and the CLI catch it without loading torch or onnxruntime."""
from __future__ import annotations

from trainer.errors import UserError


class CaptionError(UserError):
    """A caption model that cannot be used, or an option it does not take; the message names it and the fix."""


def first_line(err: BaseException) -> str:
    """An exception's first line, short enough for a one-line message."""
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__
