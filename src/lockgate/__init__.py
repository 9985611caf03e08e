"""lockgate: an Open Inference Protocol gateway for ONNX models with inline governance."""

__version__ = "0.1.0"
