"""The engine every task shares: the training loop, calibration, metrics, the size-adaptive recipe,
atomic cache writes, and writing a finished checkpoint (devices, lineage, results).

Imports ``models``; never a task package (``training.image``, ``training.text``, ``training.fusion``).
"""
