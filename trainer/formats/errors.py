"""The one error every adapter reader and writer raises for bad input."""
from trainer.errors import UserError



class AdapterFormatError(UserError, ValueError):
    """An adapter file or adapter that cannot be read, written or applied; the message names the file and the fix."""
