"""Backdoor deployment gate: black-box backdoor detection for ONNX image classifiers."""

__version__ = "0.1.0"
