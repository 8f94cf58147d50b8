"""Core library of the diffusion LM factory.

Everything here is plain Python + torch/transformers: no Prefect, no storage
layout. Importing ``dlm`` itself stays light (no torch) so that the ``factory``
command line can start fast and serve ``factory catalog`` on nodes without torch.
"""

from dlm.errors import FactoryError

__all__ = ["FactoryError"]
