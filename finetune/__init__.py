"""Middle layer: labeled subsets, baselines, linear / fine-tune / semi-supervised, the report."""
