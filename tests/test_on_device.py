"""The PyTorch engine on an accelerator: greedy tokens on the device equal the CPU's, eager and compiled, in every
mode, and a training step runs there (`gpu` marker).

Parametrised over the accelerators this machine has (CUDA, MPS): with none, every case is skipped, and CI has
none. The GPU check (`overfill gpu-check`) runs these cases on the device it is given:
`OVERFILL_TEST_DEVICES=cuda:1` names the devices instead (`cpu` there runs the cases against the CPU itself,
which checks the cases' own wiring and nothing of a device).
"""

import copy
import json
import math
import os

import pytest
import torch

from overfill import decode_step
from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from tiny import KINDS, tiny_pruned, tiny_tokenizer, write_jsonl


def _devices() -> list[str]:
    named = os.environ.get("OVERFILL_TEST_DEVICES")
    if named:
        return [name for name in named.split(",") if name]
    found = ["cuda"] if torch.cuda.is_available() else []
    return found + (["mps"] if torch.backends.mps.is_available() else [])


pytestmark = [pytest.mark.gpu, pytest.mark.parametrize("device", _devices())]
PROMPTS = ["hi", "What is the capital of France?", "Tell me a story about a dragon and a knight.", "2+2="]
CASES = {  # name: (prompts, generation settings)
    "overfill, padded batch": (PROMPTS, dict(mode="overfill")),
    "full, padded batch": (PROMPTS, dict(mode="full")),
    "pruned, padded batch": (PROMPTS, dict(mode="pruned")),
    "overfill, refresh every 4": (PROMPTS, dict(mode="overfill", refresh_every=4)),
    "overfill, 3 candidates": (PROMPTS[:2], dict(mode="overfill", num_return_sequences=3)),
    "speculative": (PROMPTS, dict(mode="speculative", draft_tokens=3)),
}


def _tokens(model, prompts, **settings) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=8, **settings)
    return [r.token_ids for r in generate(model, prompts, config)]


@pytest.mark.parametrize("kind", KINDS)
def test_the_device_gives_the_cpus_tokens(device, kind):
    full, decoder = tiny_pruned(kind)
    on_cpu = OverFillModel(full, decoder, tiny_tokenizer())
    there = OverFillModel(copy.deepcopy(full), copy.deepcopy(decoder), tiny_tokenizer()).to(device)
    for name, (prompts, settings) in CASES.items():
        want = _tokens(on_cpu, prompts, compile=False, **settings)
        for compile in (False, True):
            assert _tokens(there, prompts, compile=compile, **settings) == want, f"{name}, compile={compile}"
    assert decode_step.compile_seconds(there.decoder), "the compiled step did not run on the device"


def test_one_training_step_runs_on_the_device(device, tmp_path):
    from overfill.prune import PruneConfig, prune_model, save_pruned
    from overfill.train import TrainConfig, train
    from tiny import save_tiny

    full, tok = save_tiny(tmp_path / "full")
    save_pruned(prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=8, calib_len=64), progress=False), tok,
                tmp_path / "decoder")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")]
    write_jsonl(tmp_path / "data.jsonl", rows)
    result = train(TrainConfig(mode="overfill", model=str(tmp_path / "full"), decoder=str(tmp_path / "decoder"),
                               data=str(tmp_path / "data.jsonl"), out=str(tmp_path / "run"), val_size=2, batch_size=4,
                               max_steps=1, eval_every=0, progress=False, device=device))
    assert result.losses and all(math.isfinite(v) for v in result.losses)
    assert {p.device.type for p in result.model.decoder.parameters()} == {torch.device(device).type}
    json.dumps(result.losses)  # plain floats, as the run's JSON records them
