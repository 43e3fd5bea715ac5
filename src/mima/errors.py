"""Exception hierarchy for mima.

Every error raised on purpose by mima derives from [`MimaError`], so the CLI can print it as one line instead of a
traceback. Messages name the offending value and what was expected.
"""


class MimaError(Exception):
    """Base class of all errors raised deliberately by mima."""


class ConfigError(MimaError):
    """An invalid configuration: unknown key, bad value, or inconsistent fields."""


class DataError(MimaError):
    """A data set or batch that cannot be used: missing file, wrong schema, empty split."""


class ModelError(MimaError):
    """A model or checkpoint that cannot be loaded or does not match what was expected."""


class TrainingError(MimaError):
    """A failure during optimisation, e.g. a NaN or infinite loss."""
