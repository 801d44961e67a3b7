"""The one error type of `trainer.models`. Stdlib only, so consumers catch it without loading torch."""
from trainer.errors import UserError


class ModelLoadError(UserError):
    """A base model that cannot be loaded; the message names the file or folder and says how to fix it."""
