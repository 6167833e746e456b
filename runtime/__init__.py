"""The runtime every stage runs on: the typed config tree, one-line errors, the run lock, the Ray launcher
and session, checkpoints, and W&B tracking."""
