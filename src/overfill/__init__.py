"""overfill: two-stage OverFill models (Kim, Wang, Yan, Abdelfattah, Rush; COLM 2025, arXiv 2508.08446).

The full model prefills the prompt once; a width-pruned copy of it, which reads and extends the
full model's KV cache, decodes every later token.
"""

from overfill.errors import OverfillError

__version__ = "0.1.0"
__all__ = ["OverfillError", "__version__"]
