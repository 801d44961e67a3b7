"""Errors of the dataset pipeline. Stdlib only: the UI catches them without loading PIL or torch."""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be trained on; the message names the folder or file and the fix."""


class ImageLoadError(DatasetError):
    """One image that cannot be read; `reason` is the plain-words cause that the scan lists as skipped."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}; fix or remove the file")
