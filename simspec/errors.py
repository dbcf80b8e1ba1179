"""User-facing errors.

Anything a user can cause (a malformed trace, profile or config, an unknown policy, an impossible
capacity) raises :class:`SimspecError` with a one-line message that names the file, row or field.
The CLI prints it as ``simspec: error: <message>`` and exits with status 2, without a traceback.
"""


class SimspecError(Exception):
    """A user mistake or an impossible request, explained in one line."""


class TraceError(SimspecError):
    """A trace file that cannot be parsed or violates the canonical contract."""


class ProfileError(SimspecError):
    """A profile document that is malformed, of the wrong schema version, or lacks a stage."""


class ConfigError(SimspecError):
    """An invalid run configuration (unknown policy, bad option value, impossible capacity)."""
