"""Every generation dial crossed with the compiled decode step, on decoders converted the way the bench converts them
(a copy made under inference mode): the compiled step runs and decodes the eager loop's tokens.

The step's graph is captured by torch.compile and run by PyTorch's own kernels (`aot_eager`: seconds, no C++
build); test_decode_step.py compiles it with inductor too.
"""

import copy
import warnings

import pytest
import torch

from overfill import decode_step
from overfill.chat import ChatSession
from overfill.errors import OverfillWarning
from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from overfill.precision import decoder_dtype, set_decoder_dtype
from test_generation import PROMPTS, pruned_model

DIALS = {
    "overfill": dict(mode="overfill"),
    "refresh": dict(mode="overfill", refresh_every=3),
    "speculative": dict(mode="speculative", drafter="overfill", draft_tokens=3),
    "speculative-pruned-drafter": dict(mode="speculative", drafter="pruned", draft_tokens=3),
    "pruned": dict(mode="pruned"),
    "chat": dict(mode="overfill"),
}


def tokens(model, dial: str, compile: bool) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=8, compile=compile, **DIALS[dial])
    if dial == "chat":  # later turns decode on the cache the earlier ones left
        session = ChatSession(model, config)
        return [model.tokenizer.encode(session.say(text)) for text in ("hello", "and again")]
    return [r.token_ids for r in generate(model, PROMPTS, config)]


# Every dial on the int8 decoder (its linears are their own modules: the step calls them one by one); the fused
# layout of a float32 or bfloat16 decoder is built the same way whatever the dial, so one dial each covers it.
CASES = [("int8", dial) for dial in DIALS] + [("float32", "overfill"), ("bfloat16", "overfill")]


@pytest.mark.parametrize("dtype, dial", CASES)
def test_compiled_steps_decode_the_eager_tokens(dtype, dial, monkeypatch):
    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")
    pair = pruned_model("llama")
    with torch.inference_mode(), warnings.catch_warnings():  # as the bench makes its overfill@DTYPE rows
        warnings.simplefilter("ignore", OverfillWarning)
        model = OverFillModel(pair.full, set_decoder_dtype(copy.deepcopy(pair.decoder), dtype), pair.tokenizer)
    assert decoder_dtype(model.decoder) == dtype
    eager = tokens(model, dial, compile=False)
    compiled = tokens(model, dial, compile=True)
    assert sum(map(len, eager)) > 2 * len(eager)
    if dtype == "bfloat16" and not dial.startswith("speculative"):
        # bfloat16 rounds the compiled step's fused products its own way: a near tie can flip a token, and a chat's
        # next turn then reads another history. The full model's token and the first compiled decoder step agree.
        # (Greedy speculative decoding keeps the full model's tokens whatever drafts them: exact in every dtype.)
        assert [reply[:2] for reply in compiled] == [reply[:2] for reply in eager]
        if dial != "chat":
            agree = sum(a == b for e, c in zip(eager, compiled, strict=True) for a, b in zip(e, c, strict=True))
            assert agree > 0.9 * sum(map(len, eager))
    else:
        assert compiled == eager
