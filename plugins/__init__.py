"""ortq's built-in plugins (installed as ``ortq.plugins``), registered exactly as third-party plugins are.

- ``ops/``: op quantizers, one module per op family;
- ``calibrators/``: ways to reduce observed statistics to ranges;
- ``backends/``: deployment targets.
"""
