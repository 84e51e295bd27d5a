"""Export errors: a failed export or parity check is the user's to act on, so it is a UserError."""

from __future__ import annotations

from dfineseg.infer.errors import BackendUnavailableError, UserError


class ExportError(UserError):
    """An export step failed; the message names the artefact, the step and what to do."""


class ParityError(ExportError):
    """An exported artefact disagrees with PyTorch; the message names each failed check and by how much."""


class ExportBackendUnavailable(ExportError, BackendUnavailableError):
    """The toolchain for a format (TensorRT, a GPU, OpenVINO, NNCF) is missing here."""
