"""Errors a user can act on. Every message names the thing, the value and what was expected."""


class AlloykitError(Exception):
    """Base class of every error alloykit raises on purpose."""


class CheckpointError(AlloykitError):
    """A checkpoint cannot be read: missing, corrupt, truncated or unsafe."""


class MismatchError(AlloykitError):
    """Models disagree: different keys, shapes or dtypes, or a base that is not their base."""


class ParameterError(AlloykitError, ValueError):
    """A method parameter is unknown, of the wrong type or out of range."""


class RecipeError(AlloykitError, ValueError):
    """A recipe cannot be understood or asks for something alloykit does not support."""


class NonFiniteError(AlloykitError):
    """An input tensor holds NaN or Inf."""


class OutputError(AlloykitError):
    """The output cannot be written there: it would overwrite an input, no space, no permission."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class MissingDependencyError(AlloykitError, ImportError):
    """An optional library a feature needs is not installed; the message says what to install."""


class DeviceMemoryError(AlloykitError):
    """An accelerator ran out of memory on a job (and falling back to the host was not allowed)."""
