"""Layer 0, the vocabulary: types, scheme arithmetic, the graph index, errors, the plan and report data,
and the base classes and hookspecs that plugins implement. Imports nothing else from ortq.
"""
