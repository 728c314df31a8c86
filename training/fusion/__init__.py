"""The image + text fusion task: paired data, the parents' transfer, late fusion (scorers, sentiment
lexicon, sentence encoder, head) and joint fusion, and the ``finetune-fusion`` and ``fusion-study``
commands (the study itself lives in ``training.studies``)."""
