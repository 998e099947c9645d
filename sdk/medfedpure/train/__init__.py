"""Plain training loops per model and gate calibration, over torch and the models package.

Submodules: ``loop`` (the shared epoch loop, learning-rate envelope, optimizer state), ``classifier``,
``mae``, ``purifier`` (the DDPM teacher), ``distill`` (the few-step student), ``validate``, ``calibrate``
(the gate's statistics come from ``medfedpure.gate``). Checkpoints are written and read by
``medfedpure.models.weights``. Import submodules directly; this package does not import torch on its own.
"""
