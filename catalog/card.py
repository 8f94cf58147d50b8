"""README.md: an HF-style model card rendered from a version's content.

The card is a pure function of (name, version, content, ensemble spec), all covered by the
content digest, so every publisher of one version writes byte-identical cards. Lineage and
the creation time are not content: they live in MANIFEST.json (``factory catalog show``).

Front matter keys follow the Hugging Face model card spec: license, base_model,
base_model_relation, library_name, pipeline_tag, tags, model-index. The YAML is emitted by a
tiny block-style writer (strings are JSON-quoted, which YAML reads as double-quoted scalars),
so the catalog needs no YAML library.
"""

from __future__ import annotations

import json
from typing import Any

from dlm_factory.catalog.schema import Content, EnsembleSpec

_KIND_LINE = {
    "general": "A general diffusion language model",
    "specialist": "A small per-user specialist model",
    "ensemble": "An ensemble of a general model and a user's specialist",
}


def render_card(name: str, version: str, content: Content, ensemble: EnsembleSpec | None = None) -> bytes:
    front: dict[str, Any] = {"license": content.license}
    if content.base_model:
        front["base_model"] = content.base_model
    if content.base_model_relation:
        front["base_model_relation"] = content.base_model_relation
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = list(content.tags)
    if content.evals:
        front["model-index"] = [{"name": name, "results": _model_index(content)}]

    ref = f"{name}:{version}"
    pull = f"factory catalog pull {ref} ./{name}"
    if content.kind == "ensemble":
        pull = f"factory catalog pull --user {content.user} {ref} ./{name}"
    lines = ["---", *_yaml(front), "---", "", f"# {name}", "",
             f"{_KIND_LINE[content.kind]}, published by the DLM factory catalog.", "",
             "| | |", "|---|---|", f"| version | `{version}` |", f"| digest | `{content.digest()}` |",
             f"| kind | {content.kind} |"]
    if content.user:
        lines.append(f"| user | {content.user} |")
    if content.base_model:
        relation = f" ({content.base_model_relation})" if content.base_model_relation else ""
        lines.append(f"| base model | {_cell(content.base_model)}{relation} |")
    lines.append(f"| license | {_cell(content.license)} |")

    if ensemble is not None:
        lines += ["", "## Ensemble", "",
                  f"Combination rule: `{_cell(ensemble.combination.rule)}`. Members are pulled with "
                  "the ensemble into `members/<name>/`.", "",
                  "| member | role | version | weight |", "|---|---|---|---|"]
        for m in ensemble.members:
            weight = ensemble.combination.weights.get(m.name)
            lines.append(f"| {m.name} | {m.role} | `{m.version}` | {'' if weight is None else weight} |")
        if ensemble.router:
            lines += ["", f"Router: `{_cell(json.dumps(ensemble.router, sort_keys=True))}`"]

    if content.evals:
        lines += ["", "## Evaluation", "", "| dataset | split | metric | value |", "|---|---|---|---|"]
        for e in content.evals:
            lines.append(f"| {_cell(e.dataset)} | {_cell(e.split or '')} | {_cell(e.metric)} | {e.value:.6g} |")

    if content.parents:
        lines += ["", "## Parents", "", "| name | version | role | digest |", "|---|---|---|---|"]
        for p in content.parents:
            lines.append(f"| {_cell(p.name or '')} | {p.version or ''} | {p.role or ''} | `{p.digest}` |")

    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---:|---|"]
    for f in content.files:
        lines.append(f"| {f.path} | {f.size} | `{f.sha256[:16]}…` |")

    lines += ["", "## Use", "", "```", pull, "```", "",
              "`pull` verifies every sha256 before the files are used. Weights are safetensors "
              "only; load with `trust_remote_code=False`. Provenance (flow run, git SHA, image, "
              f"data digests, config) is in MANIFEST.json: `factory catalog show {ref}`.", ""]
    return "\n".join(lines).encode()


def _model_index(content: Content) -> list[dict]:
    groups: dict[tuple, list] = {}
    for e in content.evals:
        groups.setdefault((e.task, e.dataset, e.split), []).append({"type": e.metric, "value": e.value})
    results = []
    for (task, dataset, split), metrics in groups.items():
        ds = {"name": dataset, "type": dataset}
        if split:
            ds["split"] = split
        results.append({"task": {"type": task}, "dataset": ds, "metrics": metrics})
    return results


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)  # YAML 1.1 readers want a dot in the mantissa: 1.0e-05, not 1e-05
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return json.dumps(str(value), ensure_ascii=True)


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML for dicts/lists of scalars (enough for model card front matter)."""
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:")
                out += _yaml(v, indent + 2)
            elif isinstance(v, dict | list):
                out.append(f"{pad}{k}: {'[]' if isinstance(v, list) else '{}'}")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                inner = _yaml(item, indent + 2)
                out.append(f"{pad}- {inner[0].lstrip()}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_scalar(item)}")
    else:
        out.append(pad + _scalar(value))
    return out
