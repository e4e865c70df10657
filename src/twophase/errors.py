"""The project's own error type: anything the user can fix, said in one line."""


class TwophaseError(Exception):
    """A problem with params, data, weights or training that the message tells how to fix."""
