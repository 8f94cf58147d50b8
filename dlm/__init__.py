"""Core library of the diffusion LM factory (installed as ``dlm_factory.dlm``).

Plain Python + torch/transformers: no Prefect, no CLI, no storage layout. Grouped by
concern (docs/layout.md): ``runtime`` (device, precision, ranks), ``checkpoint``
(load/save, spec, stage record), ``data``, ``diffusion`` (forward, objective,
denoisers), ``sampling``, ``train``, ``stages``, ``evaluation``. Importing the
package itself stays light (no torch).
"""

from dlm_factory.dlm.errors import FactoryError

__all__ = ["FactoryError"]
