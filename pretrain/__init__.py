"""SimCLR pretraining: the per-worker training loop, the model (timm backbone + lightly head), batch
augmentation, the optimiser and schedule, the kNN monitor, and the `selfsup pretrain` command."""
