"""Studies and baselines apart from the shipped recipes: ``transfer-study`` (``transfer``: does an
image-pretrained trunk help text?) and ``fusion-study`` (``fusion``: which modality and which fusion
helps, and does transfer help?). Each reuses its task's halves; the task CLIs load them only when their command runs, and no
shipped recipe depends on them."""
