"""Instruction data: JSONL loading (local or object store) and the embedded stdlib instruction set.

A source is either

- ``stdlib[:train|heldout|all]``: instructions extracted with ``ast`` from the running
  interpreter's standard library. For every documented function or method,
  prompt = ``Implement `name(args)`: <first paragraph of the docstring>`` and
  response = the function body after the docstring (dedented, comments kept). The
  split is by module file and is the same one ``dlm.data`` uses for the base corpus
  (``heldout_fraction`` 0.05), so held-out functions come from files that no stage of
  the factory (bootstrap, conversion, SFT) has trained on. Bodies are deduplicated
  (first occurrence wins, training split first), so no held-out response also
  appears in training.
- a ``.jsonl`` file (or a directory of them; a local path, ``file://`` or ``s3://``),
  one example per line: ``{"prompt": str, "response": str}`` or
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  whose last message is the assistant's response.

Malformed lines are counted and reported with their line numbers; a source with
more than ``max_bad_fraction`` bad lines is refused. Empty responses are skipped and
counted. Length filters need a tokenizer and live in ``dlm.instruct``.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from dlm_factory.dlm.data.corpus import (
    Document,
    heldout,
    is_stdlib,
    parse_stdlib,
    stdlib_documents,
    stdlib_source,
    top_package,
)
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    """One instruction: the conversation before the response, and the response text."""

    messages: list[dict[str, str]]  # [{"role", "content"}, ...], ending with a user turn
    response: str
    source: str  # where it came from: "json/decoder.py:42" or "data.jsonl:17"

    @property
    def prompt(self) -> str:
        """The last user message (the instruction itself)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def first_line(self) -> str:
        """First non-blank line of the response, stripped (the exact-match target)."""
        return first_line(self.response)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass
class BadLine:
    where: str  # "file:line"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class DataReport:
    """What loading a source kept and dropped (length filters are added by dlm.instruct)."""

    source: str
    lines: int = 0  # non-blank JSONL lines, or documented functions found
    examples: int = 0  # kept
    bad_lines: list[BadLine] = field(default_factory=list)
    empty_responses: int = 0
    duplicates: int = 0

    def to_dict(self) -> dict:
        return {"source": self.source, "lines": self.lines, "examples": self.examples,
                "bad_lines": len(self.bad_lines), "bad_line_numbers": [str(b) for b in self.bad_lines[:20]],
                "empty_responses": self.empty_responses, "duplicates": self.duplicates}


def load_examples(src: str, *, heldout_fraction: float = 0.05, max_bad_fraction: float = 0.05,
                  max_doc_chars: int = 300) -> tuple[list[Example], DataReport]:
    """Examples from ``stdlib[:split]`` or a JSONL path/URL (see the module docstring)."""
    if is_stdlib(src):
        s = parse_stdlib(src)
        return stdlib_instructions(s.split, heldout_fraction=heldout_fraction, max_doc_chars=max_doc_chars,
                                   exclude=s.exclude)
    return read_jsonl(src, max_bad_fraction=max_bad_fraction)


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(src: str, *, max_bad_fraction: float = 0.05) -> tuple[list[Example], DataReport]:
    """Read ``{"prompt","response"}`` / ``{"messages"}`` lines from a file or a dir of ``*.jsonl``.

    Raises FactoryError when more than ``max_bad_fraction`` of the non-blank lines are
    malformed (the message names the first bad line numbers), or when nothing is left.
    """
    root = materialize(src, patterns=("*.jsonl",))
    files = [root] if root.is_file() else sorted(root.rglob("*.jsonl"))
    if not files:
        raise FactoryError(f"{src}: no *.jsonl files")
    report = DataReport(source=str(src))
    examples: list[Example] = []
    for f in files:
        name = f.name if root.is_file() else f.relative_to(root).as_posix()
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FactoryError(f"{f}: not UTF-8 text (byte {e.start})") from e
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            report.lines += 1
            where = f"{name}:{number}"
            try:
                messages, response = parse_record(line)
            except ValueError as e:
                report.bad_lines.append(BadLine(where, str(e)))
                continue
            if not response.strip():
                report.empty_responses += 1
                continue
            examples.append(Example(messages, response, where))
    report.examples = len(examples)
    bad = len(report.bad_lines)
    if bad:
        shown = "; ".join(str(b) for b in report.bad_lines[:5]) + ("; ..." if bad > 5 else "")
        if bad > max_bad_fraction * max(report.lines, 1):
            raise FactoryError(f"{src}: {bad} of {report.lines} lines are malformed "
                               f"({bad / max(report.lines, 1):.1%} > max_bad_fraction {max_bad_fraction:.1%}): {shown}")
        log.warning("%s: skipped %d malformed line(s): %s", src, bad, shown)
    if report.empty_responses:
        log.warning("%s: skipped %d example(s) with an empty response", src, report.empty_responses)
    if not examples:
        raise FactoryError(f"{src}: no usable examples ({report.lines} lines, {bad} malformed, "
                           f"{report.empty_responses} empty responses)")
    return examples, report


def parse_record(line: str) -> tuple[list[dict[str, str]], str]:
    """(messages before the response, response) of one JSONL line; ValueError with a short reason."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
                raise ValueError(f'messages[{i}] must be {{"role": system|user|assistant, "content": str}}')
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's response")
        history = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        if not any(m["role"] == "user" for m in history):
            raise ValueError("no user message before the response")
        return history, msgs[-1]["content"]
    prompt, response = obj.get("prompt"), obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError('expected "prompt" and "response" strings or a "messages" list')
    if not prompt.strip():
        raise ValueError("empty prompt")
    return [{"role": "user", "content": prompt}], response


# ----------------------------------------------------------------------------- stdlib set


def function_examples(source: str, module: str, *, max_doc_chars: int = 300) -> list[Example]:
    """One example per documented function/method of a module's source (nested functions skipped).

    Prompt: ``Implement `name(args)`: <docstring summary>`` (methods: ``Class.name``);
    the summary is the docstring's first paragraph on one line, and functions whose
    summary is longer than ``max_doc_chars`` are skipped. Response: the statements
    (and comments) after the docstring, their indentation removed. Functions with nothing
    after the docstring are skipped.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out: list[Example] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                ex = _function_example(node, lines, prefix, module, max_doc_chars)
                if ex is not None:
                    out.append(ex)

    visit(tree.body, "")
    return out


def _function_example(node, lines: list[str], prefix: str, module: str, max_doc_chars: int) -> Example | None:
    doc = ast.get_docstring(node, clean=True)
    if not doc or len(node.body) < 2:
        return None
    summary = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
    if not summary or len(summary) > max_doc_chars:
        return None
    first = node.body[1]
    if first.lineno <= node.body[0].end_lineno:  # `"doc"; x = 1` on one line
        return None
    indent = first.col_offset
    body = []
    for line in lines[node.body[0].end_lineno : node.end_lineno]:  # comments after the docstring included
        line = line.rstrip()
        body.append(line[indent:] if line[:indent].isspace() or not line[:indent] else line)
    response = "\n".join(body).strip("\n")
    if not response.strip():
        return None
    name = f"{prefix}{node.name}({ast.unparse(node.args)})"
    if isinstance(node, ast.AsyncFunctionDef):
        name = "async " + name
    prompt = f"Implement `{name}`: {summary}"
    return Example([{"role": "user", "content": prompt}], response, f"{module}:{node.lineno}")


def stdlib_instructions(split: str = "train", *, heldout_fraction: float = 0.05,
                        max_doc_chars: int = 300, exclude=()) -> tuple[list[Example], DataReport]:
    """The embedded instruction set from the interpreter's stdlib (see the module docstring).

    Deterministic: files in sorted order, split by file name with ``dlm.data.heldout``.
    Deduplication keys on the response (whitespace-normalised) across both splits,
    training split first, so a held-out body never also occurs in training.
    """
    if split not in {"train", "heldout", "all"}:
        raise FactoryError(f"unknown stdlib split '{split}' (train, heldout or all)")
    parts = ("train", "heldout") if split == "all" else (split,)
    found = _stdlib_sets(heldout_fraction, max_doc_chars)
    report = DataReport(source=stdlib_source(split, exclude))
    kept: list[Example] = []
    for part in parts:
        examples, functions, duplicates = found[part]
        kept.extend(Example([dict(m) for m in ex.messages], ex.response, ex.source) for ex in examples
                    if top_package(ex.source.rpartition(":")[0]) not in exclude)
        report.lines += functions
        report.duplicates += duplicates
    report.examples = len(kept)
    if not kept:
        raise FactoryError(f"stdlib:{split}: no documented functions found")
    return kept, report


@functools.lru_cache(maxsize=4)
def _stdlib_sets(heldout_fraction: float, max_doc_chars: int) -> dict[str, tuple[list[Example], int, int]]:
    """``instruction_sets`` of the whole stdlib, parsed once per process."""
    return instruction_sets(stdlib_documents("all"), heldout_fraction=heldout_fraction, max_doc_chars=max_doc_chars)


def instruction_sets(docs: list[Document], *, heldout_fraction: float = 0.05,
                     max_doc_chars: int = 300) -> dict[str, tuple[list[Example], int, int]]:
    """Split module files with ``dlm.data.heldout`` and deduplicate bodies, training split first.

    Returns {"train" | "heldout": (examples, functions found, duplicates dropped)}.
    """
    seen: set[str] = set()
    out = {}
    for part in ("train", "heldout"):
        kept, functions, duplicates = [], 0, 0
        for doc in sorted(docs, key=lambda d: d.name):
            if heldout(doc.name, heldout_fraction) != (part == "heldout"):
                continue
            for ex in function_examples(doc.text, doc.name, max_doc_chars=max_doc_chars):
                functions += 1
                key = "\n".join(line.strip() for line in ex.response.splitlines() if line.strip())
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                kept.append(ex)
        out[part] = (kept, functions, duplicates)
    return out


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Write examples as ``{"messages": [...]}`` lines (e.g. to export the stdlib set)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            msgs = [*ex.messages, {"role": "assistant", "content": ex.response}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path
