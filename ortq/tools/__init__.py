"""Layer 4, the tools beside the pipeline: preprocess, QAT import, debug, evaluate, accuracy-driven search.
They call the pipeline; the pipeline never calls them.
"""
