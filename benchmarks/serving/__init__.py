"""Serving benchmark: our service vs MAX_BATCH_SIZE=1 vs LitServe vs the in-process limit (see run.py)."""
