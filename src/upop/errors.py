"""The one exception type for user-facing errors: its message is one line naming what is wrong and what is accepted."""


class UPopError(Exception):
    """Bad input or a state the user can fix. The CLI prints ``error: <message>`` and exits non-zero."""
