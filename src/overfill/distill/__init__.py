"""`overfill distill`: the full model's own replies to a file of prompts, as a chat JSONL that `overfill train` reads.

config.py holds the settings (the command's flags), engines.py what generates the replies (our own
loop or vLLM), output.py the resumable output file and its settings, run.py the command itself.
"""

from overfill.distill.config import DistillConfig
from overfill.distill.run import DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "distill"]
