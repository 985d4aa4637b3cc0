"""The one base class for errors caused by the user's input or files.

The CLI catches `UserError` and prints its message (which names the file and the fix) with
exit code 2 and no traceback. Anything else is a bug and keeps its traceback. It derives from
ValueError so code that caught the old per-module ValueErrors keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, a missing or wrong file, an impossible setting: the message says how to fix it."""
