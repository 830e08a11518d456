"""Layer 6 (above the built-in plugins, layer 5), the public surface: the :class:`~ortq.api.toolkit.Toolkit`
facade, the ONNX Runtime drop-ins in :mod:`ortq.api.compat`, and the click CLI.
"""
