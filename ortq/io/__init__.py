"""Layer 1, model and data I/O: reading and writing models (external data, staged saves), calibration
data in every accepted form, images, and the calibration-state file. Imports only :mod:`ortq.core`.
"""
