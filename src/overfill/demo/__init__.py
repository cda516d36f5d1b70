"""`overfill demo`: the paper's experiment at laptop scale, end to end (run.py)."""

from overfill.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
