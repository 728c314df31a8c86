"""The engine every task shares: the trainer protocol and its driver (``trainer``), the options and
recipe shapes (``options``, ``recipe``), what a refit means (``refit``), the training loop,
calibration, metrics, the size-adaptive recipe, atomic cache writes, and writing a finished
checkpoint (devices, lineage, results).

Imports ``models``; never a task package (``training.image``, ``training.text``, ``training.fusion``).
"""
