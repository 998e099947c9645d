"""Plain training loops per model, checkpoints (safetensors with config inside), gate calibration.

Submodules: ``checkpoint``, ``loop`` (shared epoch loop), ``classifier``, ``mae``, ``calibrate``
(the gate's statistics come from ``medfedpure.gate``), ``cli`` (``medfedpure train …``). Import them directly;
this package does not import torch on its own.
"""
