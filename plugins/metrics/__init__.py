"""Built-in metric plugins for ``ortq evaluate``, one module per family.

- ``agreement``: does the candidate pick the reference's class (``top1``, ``top5``);
- ``labels``: accuracy against ground-truth labels (``accuracy``, ``top5_accuracy``);
- ``similarity``: how close the raw outputs stay (``cosine``, ``mse``, ``sqnr``).
"""
