"""`overfill demo`: the general-purpose recipe at demo scale, end to end (run.py): composed prompts (prompts.py,
families.py), the full model's own replies, both decoders trained on them, agreement and a chat comparison (report.py)."""

from overfill.demo.config import DemoConfig
from overfill.demo.run import run_demo

__all__ = ["DemoConfig", "run_demo"]
