"""The one exception type users see: a single-line message that names the problem and the fix."""


class OverfillError(Exception):
    """Bad input or state the user can fix. The CLI prints it as one line, without a traceback."""
