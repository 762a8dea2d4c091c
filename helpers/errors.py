"""The project's error classes: what the command line reports as one line.

``helpers.cli.run`` catches ``ProjectError`` and logs its message without a traceback
(``--verbose`` adds it). Anything else, a ``ValueError`` from deep inside Keras
included, is a bug and keeps its traceback.

    ProjectError
      UsageError (also a ValueError)      a bad flag, argument or input
        MissingFileError (also a FileNotFoundError)
        helpers.data.DatasetError         a missing, empty or unreadable dataset
        helpers.backbones.WeightsUnavailableError
      NaNLossError (also a RuntimeError)  training diverged and was stopped
"""


class ProjectError(Exception):
    """An error the user can act on; reported as one line by ``helpers.cli.run``."""


class UsageError(ProjectError, ValueError):
    """A flag, argument or input file the run cannot work with; the message names it."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file named by the user does not exist."""


class NaNLossError(ProjectError, RuntimeError):
    """Training produced a NaN or infinite loss and was stopped."""
