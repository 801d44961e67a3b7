"""The engine's one base class for errors a user can fix. Stdlib only: every consumer catches it cheaply.

The CLI prints a `UserError` as one line and exits 2; the app shows it as one message. Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input or a state the user can fix; the message names the file, folder or field, and the fix."""
