"""Importing overfill is a library import: other libraries' log levels stay as their user set them."""

import json
import subprocess
import sys

# Loggers overfill's own command line quiets (cli/app.py), and the libraries it imports.
LOGGERS = ("transformers", "torch", "torchao", "torch.utils._pytree", "accelerate", "datasets", "")


def test_importing_overfill_leaves_other_libraries_log_levels_alone():
    script = f"""
import json, logging
import torch, transformers, torchao  # the libraries first: their own import-time settings are theirs
names = {LOGGERS!r}
for name in names:
    logging.getLogger(name).setLevel(logging.INFO)  # what a user of the library chose
before = {{name: logging.getLogger(name).level for name in names}}
import overfill, overfill.precision, overfill.modeling, overfill.generation, overfill.decode_step, overfill.cli
after = {{name: logging.getLogger(name).level for name in names}}
print(json.dumps([before, after]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert after == before
