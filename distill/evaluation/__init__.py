"""Offline quality: Frechet distance, precision/recall and mode coverage in a shipped classifier's features,
the in-training tracker, and the ``onestep eval`` / ``onestep sample`` commands."""
