"""Masked diffusion: forward passes under diffusion masks, the objective, and denoisers (the one interface of the ELBO and the samplers)."""
