"""Training: the one loop of every stage, its checkpoints, and the DeepSpeed engine."""
