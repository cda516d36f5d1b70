"""overfill: two-stage OverFill models (Kim, Wang, Yan, Abdelfattah, Rush; COLM 2025, arXiv 2508.08446).

The full model prefills the prompt once; a width-pruned copy of it, which reads and extends the
full model's KV cache, decodes every later token.
"""

import logging

from overfill.errors import OverfillError

# transformers imports torchao (our int8 decoder) when it is installed; on a CPU machine torchao then
# reports each GPU kernel library it cannot load, and torch a deprecation per torchao enum: noise
# on every command. Real errors still come through.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["OverfillError", "__version__"]
