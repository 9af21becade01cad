"""The typed errors users see: all of rnngen's error types live here.

Every error a user can cause derives from `RnngenError`; the CLI prints its
message as one line and exits non-zero, never with a traceback; the server maps
each to a gRPC status code (rnngen.serving.protocol.STATUS_OF).
"""

from __future__ import annotations

import string
from typing import Any, Mapping


class RnngenError(Exception):
    """Base class: the message is meant for the user, as one line."""


class InvalidParameterError(RnngenError, ValueError):
    """A parameter is outside its allowed range (names the parameter, the value, the range).

    Made with `about`, the message is one template for every door: it names
    parameters as `{name}` fields, and each door spells them in its own words
    (`in_terms_of`: CLI options, proto fields); str() spells them as Python's
    parameter names. Values are fields too, filled in as given.
    """

    template: str | None = None
    values: Mapping[str, Any] = {}

    @classmethod
    def about(cls, template: str, **values: Any) -> InvalidParameterError:
        error = cls(_fill(template, values, {}))
        error.template, error.values = template, values
        return error

    @property
    def parameters(self) -> tuple[str, ...]:
        """The parameters the message names, the refused one first."""
        return tuple(_parameter_fields(self.template, self.values)) if self.template else ()

    def in_terms_of(self, names: Mapping[str, str]) -> str:
        """The message with each parameter spelled as `names` spells it (as Python's name where it has none)."""
        return _fill(self.template, self.values, names) if self.template else str(self)


def _parameter_fields(template: str, values: Mapping[str, Any]) -> dict[str, None]:
    fields = (name for _, name, _, _ in string.Formatter().parse(template) if name)
    return dict.fromkeys(name for name in fields if name not in values)


def _fill(template: str, values: Mapping[str, Any], names: Mapping[str, str]) -> str:
    spelled = {name: names.get(name, name) for name in _parameter_fields(template, values)}
    return template.format_map({**values, **spelled})


class MissingExtraError(RnngenError):
    """A command needs packages of an optional extra that is not installed (train, export)."""


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
