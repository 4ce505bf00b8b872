"""One exception type for every problem a user can fix (bad config, missing file, ...).

The CLI prints it as a single ``error: ...`` line and exits non-zero.
"""


class FedfmError(Exception):
    """A user-facing error with a one-line message."""


class ConfigError(FedfmError):
    """The run config has an unknown key, a wrong type or an invalid value."""
