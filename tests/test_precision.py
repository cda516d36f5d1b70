"""A low-precision decoder behind a full-precision prefill, on tiny models: what changes, what does not, and that
it survives save/load."""

import copy
import warnings

import pytest
import torch

from overfill import OverfillError, precision
from overfill.errors import OverfillWarning
from overfill.generation import GenerationConfig, generate_ids
from overfill.model_source import ModelSource
from overfill.modeling import OverFillModel, handoff
from overfill.precision import decoder_dtype, set_decoder_dtype, weight_bytes
from overfill.tensors import left_pad
from test_generation import PAD, pruned_model
from tiny import save_tiny

PROMPTS = [[1, 5, 9, 14, 3], [1, 7, 7, 30, 22, 41, 8, 12, 6]]


def greedy(model, n=10) -> torch.Tensor:
    ids, mask = left_pad(PROMPTS, PAD)
    steps = list(generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=n), eos_ids=set(), pad_id=PAD))
    return torch.stack([s.tokens for s in steps], dim=1)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_only_the_decoder_changes_and_the_cache_keeps_its_dtype(dtype):
    model = pruned_model("llama")
    full_before = {k: v.clone() for k, v in model.full.state_dict().items()}
    fp32_bytes = weight_bytes(model.decoder)
    reference = copy.deepcopy(model.decoder)
    set_decoder_dtype(model.decoder, dtype)
    assert decoder_dtype(model.decoder) == dtype and decoder_dtype(reference) == "float32"
    assert weight_bytes(model.decoder) < 0.6 * fp32_bytes
    for name, tensor in model.full.state_dict().items():
        assert torch.equal(tensor, full_before[name]) and tensor.dtype == torch.float32
    # The decoder reads and extends the full model's float32 cache: its entries stay float32.
    from overfill.kv_cache import GrowingCache

    cache = GrowingCache()
    ids, mask = left_pad(PROMPTS, PAD)
    tokens = torch.stack([s.tokens for s in generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=6),
                                                         eos_ids=set(), pad_id=PAD, cache=cache)], 1)
    assert {layer.keys.dtype for layer in cache.layers} == {torch.float32} and tokens.shape == (2, 6)
    # Close to the float32 decoder under teacher forcing (same first token: the full model's).
    targets = torch.randint(3, 60, (2, 8))
    with torch.no_grad():
        low = handoff(model.full, model.decoder, ids, mask, targets, torch.ones_like(targets))
        high = handoff(model.full, reference, ids, mask, targets, torch.ones_like(targets))
    assert torch.equal(low.first, high.first)
    p_low, p_high = low.rest.float().softmax(-1), high.rest.float().softmax(-1)
    assert (p_low - p_high).abs().max() < 0.1 and not torch.equal(low.rest.float(), high.rest.float())


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_low_precision_decoder_round_trips_through_save_and_load(dtype, tmp_path):
    full, tok = save_tiny(tmp_path / "full")
    model = pruned_model("llama")
    model = OverFillModel(full, model.decoder, tok, full_source=str(tmp_path / "full"))
    set_decoder_dtype(model.decoder, dtype)
    expected = greedy(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OverFillModel.from_pretrained(tmp_path / "ckpt")
    assert decoder_dtype(loaded.decoder) == dtype
    for (name, a), b in zip(model.decoder.state_dict().items(), loaded.decoder.state_dict().values(), strict=True):
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata, b.qdata) and torch.allclose(a.scale, b.scale, rtol=1e-6), name
        else:
            assert torch.equal(a, b), name
    assert torch.equal(greedy(loaded), expected)
    for name, tensor in loaded.full.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name])  # the full model untouched
    as_float = ModelSource(checkpoint=str(tmp_path / "ckpt"), decoder_dtype="float32").load()
    assert decoder_dtype(as_float.decoder) == "float32"  # the flag overrides the recorded dtype


def test_a_float16_pair_is_named_float16_and_saved_without_a_decoder_dtype(tmp_path):
    """A decoder in a dtype both models share is not reported as float32 (which would skip a float32 bench row),
    nor recorded as the decoder's own; a checkpoint recording a dtype this overfill does not know is one line."""
    import json

    full, tok = save_tiny(tmp_path / "full")
    model = OverFillModel(full, pruned_model("llama").decoder, tok, full_source=str(tmp_path / "full"))
    model.decoder.half()
    assert decoder_dtype(model.decoder) == "float16"
    model.save_pretrained(tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "overfill.json"
    meta = json.loads(meta_path.read_text())
    assert "decoder_dtype" not in meta
    meta_path.write_text(json.dumps({**meta, "decoder_dtype": "int4"}))
    with pytest.raises(OverfillError, match="records decoder_dtype 'int4'") as err:
        OverFillModel.from_pretrained(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


def test_bad_decoder_dtype_is_one_line():
    with pytest.raises(OverfillError, match="--decoder-dtype"):
        ModelSource(decoder="d", decoder_dtype="int4")
    with pytest.raises(OverfillError, match="--decoder-dtype"):
        from overfill.vllm.export import engine_model

        engine_model(ModelSource(decoder="d", decoder_dtype="int8"), "overfill")


@pytest.mark.parametrize("in_features", [24, 315, 844])  # widths a pruned decoder has: not multiples of the kernel's block
@pytest.mark.parametrize("rows", [1, 8])
def test_int8_layers_multiply_like_their_dequantised_weights(in_features, rows, monkeypatch):
    from torch import nn

    import overfill.precision as precision

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(in_features, 96, bias=True))
    set_decoder_dtype(layer, "int8")
    int8 = layer[0]
    assert isinstance(int8, precision.Int8Linear) and int8.qdata.dtype == torch.int8
    assert int8.qdata.shape == (96, in_features)
    x = torch.randn(2, rows, in_features)
    exact = nn.functional.linear(x, int8.dequantize(), int8.bias)
    fused = layer(x)
    assert fused.shape == exact.shape and fused.dtype == torch.float32
    # The kernel may take bfloat16 input here (precision.int8_kernel_input): ~3 significant digits.
    assert (fused - exact).abs().max() <= 0.02 * exact.abs().max()
    monkeypatch.setattr("overfill.devices.native_bfloat16", lambda device: False)  # the kernel's float32 path
    assert torch.allclose(layer(x), exact, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_a_decoder_computes_in_follows_the_devices_capability_alone(native, tmp_path, monkeypatch):
    """Capability decides (devices.native_bfloat16): the same answer on every call, with no clock read and no file
    written while converting and running a decoder, so a checkpoint's numbers never follow the machine's load."""
    import time

    from torch import nn

    monkeypatch.setattr("overfill.devices.native_bfloat16", lambda device: native)
    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path))

    def no_clock():
        raise AssertionError("the precision was timed")

    expected = torch.bfloat16 if native else torch.float32
    layer = nn.Sequential(nn.Linear(315, 40))
    x = torch.randn(3, 315)
    with monkeypatch.context() as clock:
        for name in ("perf_counter", "perf_counter_ns", "monotonic", "time", "process_time"):
            clock.setattr(time, name, no_clock)
        assert [precision.int8_kernel_input() for _ in range(3)] == [expected] * 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_decoder_dtype(layer, "int8")
            bf16 = set_decoder_dtype(nn.Sequential(nn.Linear(8, 8)), "bfloat16")
        y = layer(x)
        bf16(torch.randn(1, 8, dtype=torch.bfloat16))
    assert list(tmp_path.iterdir()) == []
    # the kernel gets the activations the capability says, and the layer's output is the product's
    assert y.dtype == torch.float32
    seen = []
    real_kernel = torch.ops.aten._weight_int8pack_mm
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda h, *rest: seen.append(h.dtype) or real_kernel(h, *rest),
                        raising=False)
    assert torch.equal(layer(x), y) and seen == [expected]
    exact = nn.functional.linear(x, layer[0].dequantize(), layer[0].bias)
    assert (y - exact).abs().max() <= (0.02 if native else 1e-5) * exact.abs().max()
    # bfloat16 warns where it is not native, and only there; int8 converts without a word either way
    messages = [str(w.message) for w in caught if issubclass(w.category, OverfillWarning)]
    assert messages == ([] if native else [precision.dtype_advice("bfloat16")])
    assert precision.precision_summary(("bfloat16", "int8"), torch.device("cpu")).endswith(
        f"PyTorch's int8 kernel with {str(expected).removeprefix('torch.')} activations")


def test_a_gpus_bfloat16_is_native_from_compute_capability_8(monkeypatch):
    from overfill import devices

    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert devices.native_bfloat16(torch.device("cuda", 0)) is native
        advice = precision.dtype_advice("bfloat16", device=torch.device("cuda", 0))
        assert (advice is None) is native and (native or "7.5" in advice)
    assert devices.native_bfloat16(torch.device("mps")) is False


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_convert_saves_a_checkpoint_with_its_decoder_in_another_dtype(dtype, tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_cli

    full, tok = save_tiny(tmp_path / "full")
    model = OverFillModel(full, pruned_model("llama").decoder, tok, full_source=str(tmp_path / "full"))
    model.save_pretrained(tmp_path / "ckpt")
    expected = greedy(ModelSource(checkpoint=str(tmp_path / "ckpt"), decoder_dtype=dtype).load())
    code, out, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "ckpt"), "--decoder-dtype", dtype,
                             "--out", str(tmp_path / "converted"))
    assert code == 0, err
    assert dtype in out
    loaded = OverFillModel.from_pretrained(tmp_path / "converted")  # no flag: the recorded dtype
    assert decoder_dtype(loaded.decoder) == dtype and decoder_dtype(model.decoder) == "float32"
    assert torch.equal(greedy(loaded), expected)
    # The folder is not replaced by accident, and the dtype must be named.
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "ckpt"), "--decoder-dtype", dtype,
                           "--out", str(tmp_path / "converted"))
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--decoder-dtype")


def test_int8_on_torchaos_kernels_saves_the_same_values(tmp_path):
    """The GPU's int8 path (torchao's weights and kernels), run here on the CPU: it counts, saves and reloads
    exactly the int8 values and scales of the CPU's fused-kernel path."""
    from overfill.precision import Int8Linear

    full, tok = save_tiny(tmp_path / "full")
    pair = pruned_model("llama")
    torchao_int8 = OverFillModel(full, set_decoder_dtype(copy.deepcopy(pair.decoder), "int8", kernels="torchao"), tok,
                                 full_source=str(tmp_path / "full"))
    fused_int8 = set_decoder_dtype(copy.deepcopy(pair.decoder), "int8", kernels="pytorch")
    assert not any(isinstance(m, Int8Linear) for m in torchao_int8.decoder.modules())
    assert decoder_dtype(torchao_int8.decoder) == "int8" and weight_bytes(torchao_int8.decoder) == weight_bytes(fused_int8)
    tokens = greedy(torchao_int8)
    torchao_int8.save_pretrained(tmp_path / "ckpt")
    loaded = OverFillModel.from_pretrained(tmp_path / "ckpt")  # on the CPU: the fused kernel's layers
    for (name, a), b in zip(fused_int8.state_dict().items(), loaded.decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (greedy(loaded) == tokens).float().mean() > 0.9  # other kernels, other rounding
