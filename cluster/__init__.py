"""Top layer: the `selfsup` CLI, the one-command pipeline, Ray job submission, cluster definitions."""
