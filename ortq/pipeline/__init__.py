"""Layer 3, the pipeline stages and the pipeline that wires them: prepare (graph passes), plan, calibrate,
parameters (and user overrides), rewrite (QDQ, dynamic, QOperator), verify; :mod:`ortq.pipeline.run`
runs them in order. Stages import the layers below, and each other only downstream.
"""
