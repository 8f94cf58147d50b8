"""The diffusion LM factory, installed as one import root so that nothing collides.

The repository keeps the design's top-level folders (``dlm/``, ``tasks/``, ``flows/``,
``catalog/``); ``pyproject.toml`` installs each of them as a subpackage of this one
(``dlm_factory.dlm``, ``dlm_factory.tasks``, ...), because generic top-level names such
as ``tasks`` or ``catalog`` would clash with other distributions in site-packages.
This folder holds the composition root (``dlm_factory.cli``) and the few helpers that
both the core and the catalog use (``dlm_factory.digest``). See docs/layout.md.
"""
