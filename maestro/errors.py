"""Typed errors raised at the framework's boundaries.

Each says what was wrong, where (file, key, shard, sample) and how to fix it. The CLI prints
them as one line and exits non-zero; library code only raises.

Every error survives pickling with its message and attributes (Ray ships a worker's exception to
the driver that way), whatever its constructor takes: `__reduce__` rebuilds it from the finished
message, not from the constructor's arguments.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[MaestroError], message: str, attrs: dict[str, Any]) -> MaestroError:
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attrs)
    return error


class MaestroError(Exception):
    """Base class of every error that maestro reports to a user."""

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), str(self), dict(self.__dict__))


class ConfigError(MaestroError):
    """A config key, value or file is invalid."""

    def __init__(self, key: str, value: object, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config key '{key}': got {value!r}; expected {expected}")


class DataError(MaestroError):
    """A source file, shard or sample does not follow its format."""


class CheckpointError(MaestroError):
    """A checkpoint is missing, incomplete or does not match the model."""


class ResourceError(MaestroError):
    """The machine or Ray cluster lacks the CPUs or GPUs a run asks for."""


class RunFailed(MaestroError):
    """The workers kept failing (a crash, not a maestro error) after the restarts Ray was allowed."""


class Diverged(MaestroError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint after it."""


def by_name(name: str, message: str) -> MaestroError:
    """The maestro error class called `name` (MaestroError when unknown) carrying `message`: how
    an error recorded by a worker as text is raised again on the driver."""
    classes = {c.__name__: c for c in _subclasses(MaestroError)}
    return _rebuild(classes.get(name, MaestroError), message, {})


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out
