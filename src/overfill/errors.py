"""The one exception type users see: a single-line message that names the problem and the fix.

Also the checks shared by every place where a user hands us text, and the warning category
the CLI prints as one `warning: ...` line.
"""

from __future__ import annotations


class OverfillError(Exception):
    """Bad input or state the user can fix. The CLI prints it as one line, without a traceback."""


class OverfillWarning(Warning):
    """Something the user should see but that does not stop the run (e.g. a prompt cut to fit the model).

    Not a UserWarning: the CLI silences those (they come from the libraries it uses) and shows these.
    """


def first_undecodable(text: str) -> int | None:
    """Index of the first character that did not come from UTF-8, or None.

    On Linux Python decodes argv and stdin with 'surrogateescape': a byte that is not UTF-8
    arrives as a lone surrogate U+DC80..U+DCFF, which no tokenizer can encode. Any lone
    surrogate is refused alike (it cannot be encoded as UTF-8 either).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_utf8(text: str, what: str, fix: str = "pass UTF-8 text (check your terminal's or the file's encoding)") -> str:
    """`text` itself, or an OverfillError naming `what` and the first bad byte when it is not UTF-8."""
    index = first_undecodable(text)
    if index is None:
        return text
    code = ord(text[index])
    # surrogateescape maps byte b to U+DC00 + b, so the user's own byte can be shown.
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    raise OverfillError(f"{what} is not valid UTF-8 ({byte} at character {index + 1}): {fix}")
