"""Every error gemma-edge raises on purpose.

One module, so that the CLI can decide which ones are fatal and how to print them
(message only, no traceback), and so callers can catch one family.
"""

from __future__ import annotations


class GemmaEdgeError(Exception):
    """Base class: the message says what is wrong and what to do about it."""

    exit_code = 2


class CheckpointError(GemmaEdgeError):
    """The source checkpoint is missing, incomplete or not an EmbeddingGemma/Gemma3 model."""


class HubUnreachableError(CheckpointError):
    """A hub id was given but the hub cannot be reached (offline machine)."""


class ConversionError(GemmaEdgeError):
    """litert-torch could not convert the encoder, or the graph came out wrong."""


class VerificationError(GemmaEdgeError):
    """A converted graph disagrees numerically with the PyTorch reference."""

    exit_code = 3


class QuantizationError(GemmaEdgeError):
    """Calibration or quantisation failed or produced a graph that is not fully int8."""


class ArtifactError(GemmaEdgeError):
    """An artifacts directory is missing, incomplete, corrupted or from another version."""


class RuntimeMissingError(GemmaEdgeError):
    """No TFLite runtime (ai-edge-litert, tflite-runtime) could be imported."""


class EdgeTpuUnavailableError(GemmaEdgeError):
    """No Edge TPU device or libedgetpu delegate could be loaded."""


class CompilerNotFoundError(GemmaEdgeError):
    """edgetpu_compiler is not on PATH."""


class CompilationError(GemmaEdgeError):
    """edgetpu_compiler failed, timed out, or wrote a model that breaks the mapping policy."""


class InputError(GemmaEdgeError):
    """Bad user input: an empty text list, an unsupported dimension, an unreadable file."""


class CalibrationDataError(GemmaEdgeError):
    """The calibration or evaluation corpus is malformed."""
