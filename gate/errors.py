"""Errors the gate raises. Each carries a one-line message meant for the person at the terminal."""


class GateError(Exception):
    """A problem with the inputs (model, data, policy) or the run; the CLI exits 2 with the message."""


class ModelError(GateError):
    """The ONNX file cannot be used as an image classifier."""


class DataError(GateError):
    """The clean-image data cannot be used with this model."""


class QueryBudgetExceeded(GateError):
    """Answering would send more images to the model than the query budget allows."""


class PolicyError(GateError):
    """A policy file is malformed."""


class UsageError(GateError):
    """The command line is wrong (exit code 4)."""
