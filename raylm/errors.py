"""The user-facing error type: one line that names the problem, the offending value and the fix."""


class RaylmError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(RaylmError):
    """A config that cannot run: bad YAML, unknown key, wrong type or an impossible combination."""

    exit_code = 2


class DataError(RaylmError):
    """A corpus, shard or manifest that cannot be used as it is."""

    exit_code = 3


class CheckpointError(RaylmError):
    """A checkpoint that cannot be used: missing, uncommitted, truncated or altered (the message names the file)."""

    exit_code = 4


class StorageError(RaylmError):
    """Object storage that cannot be used: an unknown URI scheme, a missing or denied bucket, a silent endpoint."""

    exit_code = 5
