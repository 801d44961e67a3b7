"""The one error type of `trainer.models`. Stdlib only, so consumers catch it without loading torch."""
from pathlib import Path

from trainer.errors import UserError


class ModelLoadError(UserError):
    """A base model that cannot be loaded; the message names the file or folder and says how to fix it."""


def pickle_refused_message(path: Path) -> str:
    return (f"{path} is a pickle checkpoint, which can run code when it is loaded. Convert it to .safetensors "
            f"(e.g. with a checkpoint converter you trust), or, if you trust the file, set model.trust_pickle=true "
            f"(it is then read with torch.load(weights_only=True), which refuses code)")
