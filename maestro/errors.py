"""Typed errors raised at the framework's boundaries.

Each says what was wrong, where (file, key, shard, sample) and how to fix it. The CLI prints
them as one line and exits non-zero; library code only raises.
"""


class MaestroError(Exception):
    """Base class of every error that maestro reports to a user."""


class ConfigError(MaestroError):
    """A config key, value or file is invalid."""

    def __init__(self, key: str, value: object, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config key '{key}': got {value!r}; expected {expected}")


class DataError(MaestroError):
    """A source file, shard or sample does not follow its format."""


class CheckpointError(MaestroError):
    """A checkpoint is missing, incomplete or does not match the model."""
