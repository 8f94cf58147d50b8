"""Sampling: diffusion samplers over any Denoiser, and text-level generation."""
