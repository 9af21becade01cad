"""The typed errors users see: all of rnngen's error types live here.

Every error a user can cause derives from `RnngenError`; the CLI prints its
message as one line and exits non-zero, never with a traceback; the server maps
each to a gRPC status code (rnngen.serving.protocol.STATUS_OF).
"""


class RnngenError(Exception):
    """Base class: the message is meant for the user, as one line."""


class InvalidParameterError(RnngenError, ValueError):
    """A parameter is outside its allowed range (names field, value, range)."""


class DataError(RnngenError):
    """A training or scoring text file cannot be used."""


class TokenizerError(RnngenError, ValueError):
    """Text cannot be encoded with the model's vocabulary."""


class ModelFormatError(RnngenError):
    """A file is not a usable rnngen model."""


class DeviceError(RnngenError):
    """The requested execution device cannot be used."""


class OverwriteRefusedError(RnngenError):
    """An output would replace something the user has (use --force)."""


class CheckpointError(RnngenError):
    """A checkpoint is missing, incomplete or does not fit the run."""


class TrainingDivergedError(RnngenError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ExportCheckError(RnngenError):
    """The exported graph does not compute what the PyTorch model computes."""


class ModelNotFoundError(RnngenError):
    """No served model has the requested name (NOT_FOUND)."""


class OverloadedError(RnngenError):
    """No room for another stream right now (RESOURCE_EXHAUSTED)."""


class ShuttingDownError(RnngenError):
    """The server is draining and takes no new streams (UNAVAILABLE)."""


class SessionTokenError(RnngenError):
    """A session token that cannot be used: malformed, tampered, foreign or for another model."""


class SessionExpiredError(SessionTokenError):
    """A correctly signed session token whose lifetime is over."""
