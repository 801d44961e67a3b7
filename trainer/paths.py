"""Paths as users type them. Stdlib only (the config, the dataset scan and the model info all read paths)."""
from __future__ import annotations

from pathlib import Path


def expand_path(text: str | Path) -> Path:
    """A user's path with ~ expanded; a ~name whose home folder is unknown stays as typed (validate() says so)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)
