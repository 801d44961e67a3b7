"""How a failed action reaches the user: one readable message, and every widget left as it was.

Raising gr.Error from a handler turns each of its output widgets into a red "Error" pill until it is closed, and
prints a traceback in the terminal. A guarded handler instead shows the message as a toast (and in the tab's
status line when it has one), prints it as one line, and returns "no change" for every other output.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from pathlib import Path

from trainer import UserError


class AppError(UserError):
    """Something the user asked for that cannot be done now; the message says why and what to do."""


def user_message(error: BaseException) -> str:
    """The error's text without temporary server paths: a browser upload lives in Gradio's upload folder (and an
    unpacked zip in a loradesk-upload- folder), and the user knows it by its file name."""
    text = str(error).strip() or type(error).__name__
    for root in upload_roots():
        text = re.sub(re.escape(root) + r"[^\s'\"(),;:]*", lambda m: Path(m.group(0)).name or "upload", text)
    return re.sub(r"/[^\s'\"(),;:]*/loradesk-upload-[^/\s]+/[^\s'\"(),;:]*", lambda m: Path(m.group(0)).name, text)


def upload_roots() -> list[str]:
    """Where Gradio keeps uploads (GRADIO_TEMP_DIR, else <temp>/gradio), as given and resolved."""
    root = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return sorted({root, str(Path(root).resolve())}, key=len, reverse=True)


def guarded(fn, outputs, status=None, clear=()):
    """`fn` as a Gradio handler: a user error (or a file that cannot be read or written) becomes one message.

    `outputs` is what the handler is wired to (a component or a list); `status`, one of them, receives the
    message; those in `clear` are emptied (an upload box, ready for the next file). Other errors are bugs and keep
    their traceback.
    """
    many = isinstance(outputs, (list, tuple))
    targets = list(outputs) if many else [outputs]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as e:
            message = user_message(e)
            _announce(message)
            values = [f"⚠ {message}" if t is status else None if any(t is x for x in clear) else _no_change()
                      for t in targets]
            # Gradio takes one value, not a list, for a handler wired to one output (even as a list of one)
            return values if len(values) > 1 else values[0]
    return wrapper


def _announce(message: str) -> None:
    import gradio as gr
    print(f"loradesk: {message.splitlines()[0]}", file=sys.stderr)  # one line in the terminal, no traceback
    gr.Warning(message)


def _no_change():
    import gradio as gr
    return gr.skip()
