"""The one exception type a user is meant to see.

Anything the user can fix (a bad folder, an unknown backbone, weights that cannot be had
offline, a checkpoint from elsewhere, a full disk) is raised as `XferlearnError` with a
one-line message that says what to do. The CLI prints that line and exits 2; anything else
is a bug and keeps its traceback.
"""


class XferlearnError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
