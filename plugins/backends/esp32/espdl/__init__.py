"""ESP-DL v3 ``.espdl`` model files (ESP32-S3, ESP32-P4): reader, bit-exact integer reference, writer.

* :func:`read_espdl` (``reader.py``): an ``.espdl`` file -> :class:`EspdlModel` dataclasses;
* :class:`Reference` / :func:`run_reference` / :func:`check_test_values` (``reference.py``): ESP-DL v3's
  integer arithmetic in numpy;
* :func:`write_espdl` / :func:`build_espdl` (``writer.py``): a power-of-two QDQ model -> ``.espdl``.
"""

from ortq.plugins.backends.esp32.espdl.reader import EspdlError, EspdlGraph, EspdlModel, EspdlNode, EspdlTensor, read_espdl
from ortq.plugins.backends.esp32.espdl.reference import Reference, check_test_values, run_reference
from ortq.plugins.backends.esp32.espdl.writer import build_espdl, write_espdl

__all__ = [
    "EspdlError", "EspdlGraph", "EspdlModel", "EspdlNode", "EspdlTensor", "read_espdl",
    "Reference", "check_test_values", "run_reference", "build_espdl", "write_espdl",
]
