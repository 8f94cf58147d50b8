"""Model loading from concurrent threads (Prefect runs submitted tasks in a thread pool)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, threading
from dlm_factory.dlm.checkpoint.io import load_model
errors = []
def load():
    try:
        load_model(sys.argv[1])
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=load) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
sys.exit(1 if errors else 0)
"""


def test_first_loads_from_several_threads_in_a_fresh_process(tiny_ar):
    # Regression: transformers' lazy attributes resolved by two threads at once raised
    # "cannot import name 'AutoConfig'" in a re-run of the demo flow.
    done = subprocess.run([sys.executable, "-c", SCRIPT, tiny_ar], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
