"""User-facing errors.

A :class:`LowbitError` is a problem with the user's input (a missing file, a bad recipe field, an unsupported model)
that the user can fix. Its message is one line that names the problem and the fix; the CLI prints it without a
traceback and exits non-zero. Anything else escaping lowbit is a bug.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input, carrying one line that names it and the fix."""


class ModelError(LowbitError):
    """The model cannot be found, loaded or is of an unsupported architecture."""


class DataError(LowbitError):
    """Text or a dataset is missing, too short, or would overlap between calibration and evaluation."""


class RecipeError(LowbitError):
    """A recipe is unknown or has an invalid field."""


class CalibrationError(LowbitError):
    """Calibration met values it cannot quantize (NaN or inf)."""


class ArtifactError(LowbitError):
    """A saved quantized model cannot be written or read: not a lowbit folder, an unknown version, a damaged file."""


class NoKernelError(LowbitError):
    """A quantization scheme has no real low-bit kernel here; the fake-quant simulation (``simulate=True``) runs it."""


class OutputError(LowbitError):
    """An output path cannot receive a file: a folder, a device, a link, an unwritable place, an existing model."""


class LowbitWarning(UserWarning):
    """Something the user should know that does not stop the run (a checkpoint of another run ignored); the CLI
    prints it as one ``lowbit: warning: ...`` line."""
