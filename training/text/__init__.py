"""The text task: labelled text sets and their token cache, the ``ngram_bag`` fit, training and
evaluating text checkpoints, and the ``train-text`` / ``pretrain-text``, ``finetune-text`` and
``transfer-study`` commands (the study itself lives in ``training.studies``)."""
