"""Instruction data: ast extraction, dedupe, module split, JSONL formats and malformed lines."""

from __future__ import annotations

import json
import textwrap

import pytest

from dlm_factory.dlm.data.corpus import Document, heldout
from dlm_factory.dlm.data.instructions import (
    function_examples,
    instruction_sets,
    load_examples,
    read_jsonl,
    stdlib_instructions,
    write_jsonl,
)
from dlm_factory.dlm.errors import FactoryError

MODULE = textwrap.dedent('''\
    """Module docstring."""
    import os


    def add(a, b=1, *rest, scale: float = 2.0, **kw) -> int:
        """Add two numbers.

        Longer description that is not part of the prompt.
        """
        # a comment inside the body is kept
        total = a + b
        if total > 10:
            return total * scale
        return total


    def undocumented(x):
        return x


    def only_docstring():
        """Nothing after me."""


    def long_summary():
        """''' + "word " * 80 + '''"""
        return 1


    class Box:
        """A box."""

        def get(self, key):
            """Return the value
            stored under key."""
            text = """
    not indented
    """
            return self.items[key], text

        async def fetch(self):
            """Fetch it."""
            await self.get(0)

            def inner():
                """Nested functions are not examples."""
                return 2
            return inner
''')


def test_function_examples_golden():
    got = function_examples(MODULE, "pkg/mod.py")
    assert [e.prompt for e in got] == [
        "Implement `add(a, b=1, *rest, scale: float=2.0, **kw)`: Add two numbers.",
        "Implement `Box.get(self, key)`: Return the value stored under key.",
        "Implement `async Box.fetch(self)`: Fetch it.",
    ]
    assert got[0].response == (
        "# a comment inside the body is kept\n"
        "total = a + b\n"
        "if total > 10:\n"
        "    return total * scale\n"
        "return total"
    )
    assert got[0].source == "pkg/mod.py:5"
    assert got[0].first_line == "# a comment inside the body is kept"
    # a multi-line string at column 0 keeps its text; the rest is dedented
    assert got[1].response == 'text = """\nnot indented\n"""\nreturn self.items[key], text'
    assert got[2].response.startswith("await self.get(0)\n\ndef inner():")
    assert got[0].messages == [{"role": "user", "content": got[0].prompt}]


def test_function_examples_skips_unparsable_source():
    assert function_examples("def broken(:\n", "x.py") == []


def _names(fraction: float, want_heldout: bool, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        name = f"mod{i}.py"
        if heldout(name, fraction) == want_heldout:
            out.append(name)
        i += 1
    return out


def _fn(name: str, body: str) -> str:
    return f'def {name}(x):\n    """Do {name}."""\n    {body}\n'


def test_dedupe_and_split_by_module():
    train_a, train_b = _names(0.5, False, 2)
    (held,) = _names(0.5, True, 1)
    docs = [
        Document(train_a, _fn("f", "return x + 1") + _fn("g", "return x + 1")),  # duplicate body within train
        Document(train_b, _fn("h", "return x  +  1") + _fn("k", "return x * 2")),  # whitespace differs inside a line: kept
        Document(held, _fn("f2", "return x + 1") + _fn("m", "return x - 3")),  # a training body: dropped from heldout
    ]
    sets = instruction_sets(docs, heldout_fraction=0.5)
    train, found, dups = sets["train"]
    assert [e.source for e in train] == [f"{train_a}:1", f"{train_b}:1", f"{train_b}:4"]
    assert (found, dups) == (4, 1)
    held_ex, found, dups = sets["heldout"]
    assert [e.prompt for e in held_ex] == ["Implement `m(x)`: Do m."]
    assert (found, dups) == (2, 1)


def test_stdlib_split_is_by_module_and_disjoint():
    train, report = stdlib_instructions("train")
    held, held_report = stdlib_instructions("heldout")
    assert report.examples == len(train) > 1000 and len(held) > 50
    train_files = {e.source.rsplit(":", 1)[0] for e in train}
    held_files = {e.source.rsplit(":", 1)[0] for e in held}
    assert not train_files & held_files
    assert all(heldout(f, 0.05) for f in held_files) and not any(heldout(f, 0.05) for f in train_files)
    assert not {e.response for e in train} & {e.response for e in held}
    assert held_report.duplicates > 0  # some held-out bodies also occur in training and were dropped
    again, _ = stdlib_instructions("heldout")
    assert [(e.source, e.response) for e in again] == [(e.source, e.response) for e in held]
    with pytest.raises(FactoryError, match="unknown stdlib split"):
        stdlib_instructions("dev")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_both_formats(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Say hi", "response": "hi"}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                                 {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                                 {"role": "assistant", "content": "2"}]}),
    ])
    examples, report = read_jsonl(str(f))
    assert [e.response for e in examples] == ["hi", "2"]
    assert examples[0].messages == [{"role": "user", "content": "Say hi"}]
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant", "user"]
    assert examples[1].prompt == "Two?"
    assert [e.source for e in examples] == ["d.jsonl:1", "d.jsonl:3"]
    assert (report.lines, report.examples, report.bad_lines) == (2, 2, [])
    # round trip through the exporter, and a directory source
    (tmp_path / "dir").mkdir()
    write_jsonl(examples, tmp_path / "dir" / "x.jsonl")
    again, _ = load_examples(str(tmp_path / "dir"))
    assert [(e.messages, e.response) for e in again] == [(e.messages, e.response) for e in examples]
    assert again[0].source == "x.jsonl:1"


def test_jsonl_from_object_store_url(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/instr/train.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    examples, _ = read_jsonl("memory://bucket/instr")
    assert [(e.prompt, e.response) for e in examples] == [("p", "r")]


def test_malformed_lines_reported_with_numbers_and_threshold(tmp_path, caplog):
    good = [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(8)]
    lines = good[:3] + ["{not json"] + good[3:6] + ['["a list"]', json.dumps({"prompt": "p"}),
                                                    json.dumps({"prompt": "p", "response": "   "})] + good[6:]
    f = _write(tmp_path / "bad.jsonl", lines)
    examples, report = read_jsonl(str(f), max_bad_fraction=0.3)
    assert len(examples) == 8 and report.empty_responses == 1
    assert [(b.where, b.reason.split(" (")[0]) for b in report.bad_lines] == [
        ("bad.jsonl:4", "not valid JSON"),
        ("bad.jsonl:8", "expected a JSON object, got list"),
        ("bad.jsonl:9", 'expected "prompt" and "response" strings or a "messages" list'),
    ]
    assert "bad.jsonl:4" in caplog.text and "empty response" in caplog.text
    with pytest.raises(FactoryError, match=r"3 of 12 lines are malformed .*bad.jsonl:4: not valid JSON"):
        read_jsonl(str(f), max_bad_fraction=0.2)


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no user message"),
    ({"prompt": " ", "response": "a"}, "empty prompt"),
    ({"prompt": 3, "response": "a"}, '"prompt" and "response" strings'),
])
def test_malformed_messages(tmp_path, record, reason):
    f = _write(tmp_path / "m.jsonl", [json.dumps(record)])
    with pytest.raises(FactoryError, match="1 of 1 lines are malformed") as e:
        read_jsonl(str(f))
    assert reason in str(e.value) and "m.jsonl:1" in str(e.value)


def test_empty_or_missing_sources(tmp_path):
    f = _write(tmp_path / "e.jsonl", [json.dumps({"prompt": "p", "response": ""})])
    with pytest.raises(FactoryError, match="no usable examples .*1 empty responses"):
        read_jsonl(str(f))
    with pytest.raises(FactoryError, match="no such file"):
        read_jsonl(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FactoryError, match="no \\*.jsonl files"):
        read_jsonl(str(tmp_path / "empty"))
