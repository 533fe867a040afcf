"""Offline calibration of KV cache formats from activations of the engine's own model.

`capture.py` runs a differentiable forward of the loaded decoder over samples of a text and
collects each layer's pre-RoPE keys, values and their diagonal Fisher information (what KVQuant's
fitting in kvwise.cache.kvquant.calibration needs); `command.py` is `kvwise calibrate`.

Invariants:
- Importing this package (and `command`) pulls in no tensor library: the CLI builds its parser
  from `command.add_calibrate_parser` without torch; `capture` is imported when a command runs.
"""
