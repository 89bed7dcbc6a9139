"""Development benchmarks (not part of the gate package): detection on the forge zoo, shield, speed.

Modules here may import torch (the ``forge`` extra); nothing under ``gate/`` may.
"""
