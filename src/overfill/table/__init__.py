"""`overfill table`: the paper's headline table (full, pruned, OverFill on six tasks) through lm-eval, on local files."""

from overfill.table.config import TableConfig
from overfill.table.run import run_table

__all__ = ["TableConfig", "run_table"]
