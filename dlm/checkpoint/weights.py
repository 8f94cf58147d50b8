"""Which weight files a checkpoint dir may load: safetensors only, listed and checked here.

``load_model`` used to check only that some ``*.safetensors`` existed, then let transformers
resolve the weights itself, and transformers follows more than that: a
``model.safetensors.index.json`` whose ``weight_map`` names shards of any name (a ``.bin``
shard is read with ``torch.load``), ``config.json``'s ``transformers_weights`` (which may
name ``adapter_model.bin``), and an ``adapter_config.json`` whose adapter PEFT reads from
``adapter_model.bin`` when there is no ``adapter_model.safetensors``. :func:`weight_files`
replays transformers' own order for a local dir (``model.safetensors``, else the safetensors
index) and refuses everything else, so what transformers then loads is exactly the list
returned here (plus the NF4 embeddings file that ``load_model`` reads itself when
``config.json`` records one: ``dlm.checkpoint.nf4``).
"""

from __future__ import annotations

import json
from pathlib import Path

from dlm_factory.dlm.checkpoint.nf4 import CONFIG_KEY as NF4_KEY
from dlm_factory.dlm.checkpoint.nf4 import EMBEDDINGS_FILE as NF4_FILE
from dlm_factory.dlm.errors import FactoryError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# config.json keys that make transformers read weights from somewhere else.
REDIRECT_KEYS = ("transformers_weights",)


def weight_files(path: str | Path, where: str | None = None) -> list[Path]:
    """The safetensors files a load of the checkpoint dir ``path`` reads, in order.

    Raises FactoryError (one line, naming ``where``) for: no safetensors weights (or only
    pickle ones), an index whose ``weight_map`` names anything but regular ``.safetensors``
    files inside the dir, a ``config.json`` that redirects the weights, and an adapter without
    ``adapter_model.safetensors``.
    """
    path = Path(path)
    where = where or str(path)
    root = path.resolve()
    config = _json(path / "config.json", where)
    for key in REDIRECT_KEYS:
        if isinstance(config, dict) and key in config:
            raise FactoryError(f"{where}: config.json sets {key!r}, which redirects the weights; refused "
                               f"(safetensors only, from {SAFE_WEIGHTS} or {SAFE_INDEX})")
    if (path / "adapter_config.json").exists() and not _regular(path / "adapter_model.safetensors", root):
        raise FactoryError(f"{where}: adapter_config.json without adapter_model.safetensors (pickle adapters "
                           f"are refused)")
    extra = []  # read by load_model itself, after transformers (dlm.checkpoint.nf4)
    if isinstance(config, dict) and config.get(NF4_KEY) is not None:
        if not _regular(path / NF4_FILE, root):
            raise FactoryError(f"{where}: config.json records 4-bit embeddings ({NF4_KEY}) but {NF4_FILE} is not "
                               f"a regular file inside the checkpoint dir")
        extra = [path / NF4_FILE]
    if (path / SAFE_WEIGHTS).exists() or (path / SAFE_WEIGHTS).is_symlink():
        if not _regular(path / SAFE_WEIGHTS, root):
            raise FactoryError(f"{where}: {SAFE_WEIGHTS} is not a regular file inside the checkpoint dir")
        files = [path / SAFE_WEIGHTS]
        if (path / SAFE_INDEX).exists():  # transformers ignores it then; it must still be sound
            _shards(path, root, where)
        return files + extra
    if (path / SAFE_INDEX).exists():
        return _shards(path, root, where) + extra
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    loose = sorted(p.name for p in path.glob("*.safetensors"))
    if loose:
        why = f"{', '.join(loose)} without {SAFE_INDEX}"
    elif pickled:
        why = f"only pickle weights ({', '.join(pickled)}) which are refused"
    else:
        why = "no weights"
    raise FactoryError(f"{where}: no loadable *.safetensors weights ({why})")


def _shards(path: Path, root: Path, where: str) -> list[Path]:
    index = _json(path / SAFE_INDEX, where)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FactoryError(f"{where}: {SAFE_INDEX} has no weight_map")
    out = []
    for name in sorted({str(v) for v in weight_map.values()}):
        shard = path / name
        if (not name.endswith(".safetensors") or "\\" in name or "\x00" in name
                or any(p in ("", ".", "..") for p in name.split("/")) or name.startswith("/")
                or not _regular(shard, root)):
            raise FactoryError(f"{where}: {SAFE_INDEX} names {name[:80]!r}, not a .safetensors file inside "
                               f"the checkpoint dir (safetensors only)")
        out.append(shard)
    return out


def _regular(p: Path, root: Path) -> bool:
    """A regular file that resolves inside ``root`` (a symlink out of the dir is refused)."""
    try:
        return p.is_file() and p.resolve().is_relative_to(root)
    except OSError:
        return False


def _json(p: Path, where: str):
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FactoryError(f"{where}: {p.name} is not valid JSON ({type(e).__name__})") from None
