"""ONNX Runtime custom ops used by ortq (installed as ``ortq.custom_ops``).

Import :mod:`ortq.custom_ops.observers` lazily: it imports onnxruntime_extensions, which in some
environments pulls in heavy packages, and defining its ops registers them process-wide.
"""
