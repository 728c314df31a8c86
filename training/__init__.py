"""Offline training: data loading, training loops, calibration, evaluation and the CLI.

``cli`` is the one parser (``python -m training``); ``evaluate`` and ``export`` take a checkpoint of
any task. ``engine`` is what every task shares (the trainer protocol, the options and recipe shapes,
what a refit means, loop, calibration, metrics, the adaptive recipe, writing the checkpoint);
``image``, ``text`` and ``fusion`` each own their data, task and commands; ``studies`` holds the
studies and baselines apart from the shipped recipes.

Imports ``models``; never imports ``app``.
"""
