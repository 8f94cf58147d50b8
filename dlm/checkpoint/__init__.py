"""Checkpoints: the one loader/saver, the diffusion spec, the stage record, special-token vocabulary."""
