"""User-facing error types, at the bottom of the dependency graph so every layer can raise them.

The CLI prints a `UserError` as one clear message (no traceback) and exits non-zero; anything else is
a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad user input (config, dataset, weights, model file, image): the message names it and the fix."""


class BackendUnavailableError(UserError):
    """A runtime (TensorRT, a GPU, OpenVINO, ONNX Runtime) is not installed or cannot run here."""
