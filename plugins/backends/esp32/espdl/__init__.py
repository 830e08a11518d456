"""ESP-DL v3 ``.espdl`` model files: reader, bit-exact integer reference, writer."""
