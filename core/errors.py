"""Errors that pqflow reports to users as one line, without a traceback."""


class PqflowError(Exception):
    """A user-facing failure: bad input, a missing or corrupted file, an unreachable service."""


class RecipeError(PqflowError):
    """The recipe does not validate."""


class ArtifactError(PqflowError):
    """An artifact is missing, incomplete or corrupted."""


class SourceError(PqflowError):
    """A model or data source cannot be resolved."""
