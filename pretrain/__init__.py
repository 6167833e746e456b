"""Bottom layer: config, shards, augmentation, model, the training loop and the Ray Train launcher."""
