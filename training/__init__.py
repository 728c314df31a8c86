"""Offline training: data loading, training loops, calibration, evaluation and the CLI.

Imports ``models``; never imports ``app``.
"""
