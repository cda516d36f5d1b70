import copy
import json
import math
import random

import pytest
import torch

from overfill import OverfillError
from overfill.data import collate, load_examples
from overfill.modeling import OverFillModel, activation_checkpointing
from overfill.prune import PruneConfig, prune_model, save_pruned
from overfill.train import TrainConfig, load_trainee, train
from overfill.train.loss import batch_loss, standalone_loss
from tiny import tiny_model, tiny_tokenizer, write_jsonl


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Replies that copy the question backwards: learnable, and only from the context."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return [{"question": w, "answer": w[::-1]} for w in words]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _one_thread):
    """A tiny full model (with attention dropout, so RNG state matters), its pruned decoder, data."""
    root = tmp_path_factory.mktemp("train")
    tok = tiny_tokenizer()
    full = tiny_model("llama", attention_dropout=0.1)
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    result = prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=8, calib_len=64), progress=False)
    save_pruned(result, tok, root / "dec")
    data = write_jsonl(root / "train.jsonl", _rows(24))
    return {"root": root, "full": str(root / "full"), "decoder": str(root / "dec"), "data": str(data)}


def config(setup, out, **kw) -> TrainConfig:
    base = dict(mode="overfill", model=setup["full"], decoder=setup["decoder"], data=setup["data"], out=str(out),
                val_size=4, batch_size=4, lr=3e-3, max_steps=6, warmup_steps=1, eval_every=0, progress=False, seed=3)
    base.update(kw)
    if base["mode"] == "full":
        base["decoder"] = None
    return TrainConfig(**base)


@pytest.mark.parametrize("mode", ["overfill", "pruned", "full"])
def test_training_reduces_loss_in_every_mode(setup, tmp_path, mode):
    result = train(config(setup, tmp_path / mode, mode=mode, max_steps=8))
    (start_step, start), (end_step, end) = result.val_losses[0], result.val_losses[-1]
    assert (start_step, end_step) == (0, 8)
    assert end < start - 0.3, f"{mode}: validation loss {start:.3f} -> {end:.3f}"
    assert len(result.losses) == 8 and all(torch.isfinite(torch.tensor(result.losses)))
    out = result.out
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    if mode == "full":
        assert (out / "config.json").is_file() and (out / "training.json").is_file()
    else:  # an OverFill checkpoint that generation can load, in its own mode and in overfill mode
        from overfill.generation import GenerationConfig, generate

        loaded = OverFillModel.from_pretrained(out, setup["full"])
        meta = json.loads((out / "overfill.json").read_text())
        assert meta["training"]["mode"] == mode and meta["full_fingerprint"]
        for gen_mode in (mode, "overfill"):
            gen_config = GenerationConfig(mode=gen_mode, max_new_tokens=4)
            reply = generate(loaded, "abc", gen_config)[0]
            # the whole budget, unless the reply ended on (and only on) its first end-of-turn token
            ids, eos = reply.token_ids, tiny_tokenizer().eos_token_id
            ends = ids.index(eos) + 1 if eos in ids else 4
            assert (len(ids), reply.finish_reason) == (ends, "eos" if eos in ids else "length"), ids
            # the reloaded checkpoint generates what the trained model in memory generates
            assert reply.token_ids == generate(result.model, "abc", gen_config)[0].token_ids


def test_training_on_the_refresh_schedule(setup, tmp_path):
    """--refresh-every trains on the schedule it generates with, and resume holds the run to it."""
    result = train(config(setup, tmp_path / "r", max_steps=4, refresh_every=2, checkpoint_every=2))
    (_, start), (_, end) = result.val_losses[0], result.val_losses[-1]
    assert end < start and len(result.losses) == 4
    plain = train(config(setup, tmp_path / "p", max_steps=1))
    refreshed = train(config(setup, tmp_path / "r1", max_steps=1, refresh_every=2))
    assert plain.val_losses[0][1] != pytest.approx(refreshed.val_losses[0][1], abs=1e-4)  # another schedule, other loss
    with pytest.raises(OverfillError, match="refresh-every"):
        train(config(setup, tmp_path / "r", max_steps=4, refresh_every=3, resume="latest"))
    for bad in (dict(refresh_every=-1), dict(refresh_every=4, mode="pruned")):
        with pytest.raises(OverfillError, match="refresh-every"):
            config(setup, tmp_path / "x", **bad)


def test_overfill_mode_changes_only_the_decoder(setup, tmp_path):
    before = OverFillModel.from_pair(setup["full"], setup["decoder"])
    result = train(config(setup, tmp_path / "o", max_steps=3))
    after = result.model
    for name, tensor in before.full.state_dict().items():
        assert torch.equal(tensor, after.full.state_dict()[name]), f"full model weight {name} changed"
    changed = [n for n, t in before.decoder.state_dict().items() if not torch.equal(t, after.decoder.state_dict()[n])]
    assert len(changed) == len(before.decoder.state_dict())  # every decoder weight was trained


def test_loss_definitions_agree_and_decoder_loss_depends_on_context(setup):
    tok = tiny_tokenizer()
    examples = load_examples(setup["data"], tok).examples[:3]
    full = tiny_model("llama").train()
    # decoder == full model: OverFill's loss (full-model cache) equals the standalone loss
    pair = OverFillModel(full, copy.deepcopy(full), tok)
    batch = collate(examples, pad_id=0)
    overfill_loss, n1 = batch_loss("overfill", pair, batch)
    plain_loss, n2 = standalone_loss(full, batch)
    assert n1 == n2 == sum(len(e.target_ids) - 1 for e in examples)
    torch.testing.assert_close(overfill_loss, plain_loss, rtol=1e-5, atol=1e-5)
    # the trained decoder, in training mode, reads the full model's context: other contexts, other loss
    trainee = load_trainee(config(setup, "unused"))
    trainee.set_training(True)
    torch.manual_seed(0)
    a, _ = batch_loss("overfill", trainee.module, batch)
    swapped = copy.copy(batch)
    swapped.context_ids = batch.context_ids.flip(0)
    swapped.context_mask = batch.context_mask.flip(0)
    torch.manual_seed(0)
    b, _ = batch_loss("overfill", trainee.module, swapped)
    assert abs(a.item() - b.item()) > 1e-3
    assert not activation_checkpointing(trainee.trained)
    assert trainee.pair.full.training is False and trainee.pair.decoder.training is True


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(setup, tmp_path):
    kw = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=2, eval_every=3, grad_accum=2, batch_size=2)
    whole = train(config(setup, tmp_path / "whole", **kw))

    def stop_at_5(record):
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(setup, tmp_path / "cut", **kw), on_step=stop_at_5)
    checkpoints = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    resumed = train(config(setup, tmp_path / "cut", resume="latest", **kw))
    assert resumed.losses == whole.losses  # bit-identical on CPU, the pre-resume steps included
    assert resumed.val_losses == whole.val_losses
    for (name, a), (resumed_name, b) in zip(whole.model.decoder.state_dict().items(),
                                            resumed.model.decoder.state_dict().items(), strict=True):
        assert resumed_name == name and torch.equal(a, b), name
    # a different schedule is not the same run
    with pytest.raises(OverfillError, match="--lr"):
        train(config(setup, tmp_path / "cut", resume="latest", **{**kw, "lr": 1e-3}))


def test_corrupt_checkpoint_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    train(config(setup, out, max_steps=3, checkpoint_every=1, keep_checkpoints=3))
    step1, step2 = out / "checkpoints" / "step-0000001", out / "checkpoints" / "step-0000002"
    data = bytearray((step1 / "optimizer.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (step1 / "optimizer.safetensors").write_bytes(bytes(data))
    (step2 / "trainer.json").write_text('{"format": 1, "step": ')
    for folder, reason in ((step1, "optimizer.safetensors does not match"), (step2, "not valid JSON")):
        with pytest.raises(OverfillError) as err:
            train(config(setup, out, max_steps=3, checkpoint_every=1, resume=str(folder)))
        assert "is corrupt" in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
    (out / "checkpoints" / "step-0000003").mkdir()  # an interrupted write without trainer.json
    with pytest.raises(OverfillError, match="never completed"):
        train(config(setup, out, max_steps=3, resume="latest"))


def test_config_and_out_folder_errors(setup, tmp_path):
    with pytest.raises(OverfillError, match="needs|pass --decoder"):
        TrainConfig(data=setup["data"], mode="pruned")
    with pytest.raises(OverfillError, match="unknown mode"):
        TrainConfig(data=setup["data"], mode="half", decoder=setup["decoder"])
    with pytest.raises(OverfillError, match="no data file given"):
        TrainConfig(decoder=setup["decoder"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OverfillError, match="already holds files"):
        train(config(setup, tmp_path / "busy"))
    with pytest.raises(OverfillError, match="not a training run folder"):
        train(config(setup, tmp_path / "busy", force=True))
    with pytest.raises(OverfillError, match="no checkpoint to resume"):
        train(config(setup, tmp_path / "nothing", resume="latest"))


@pytest.mark.parametrize("run", [dict(mode="overfill"), dict(mode="pruned", loss="ce+kd", kd_temperature=2.0)],
                         ids=["overfill", "pruned-ce+kd"])
def test_two_process_data_parallel_matches_one_process(setup, tmp_path, run):
    """`accelerate launch` with 2 CPU processes (gloo) trains the same run as 1 process with twice the batch.

    The step's examples depend only on seed and step (StepSampler) and the loss is token-weighted
    across processes, so the per-step losses agree up to float summation order. Pruned-mode
    distillation runs its teacher, the full model, outside the data-parallel module.
    """
    import os
    import subprocess
    import sys

    # Without dropout (whose draws differ per process), the two runs compute the same thing.
    tok, full = tiny_tokenizer(), tiny_model("llama")
    full.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    save_pruned(prune_model(full, tok, PruneConfig(ratio=0.5, calib_samples=8, calib_len=64), progress=False),
                tok, tmp_path / "dec")
    pair = {**setup, "full": str(tmp_path / "full"), "decoder": str(tmp_path / "dec")}
    single = train(config(pair, tmp_path / "one", max_steps=3, batch_size=4, **run))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in run.items()]
    flags += ["--model", pair["full"], "--decoder", pair["decoder"], "--data", pair["data"], "--val-size", "4",
             "--lr", "3e-3", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "0", "--seed", "3",
             "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "two")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "overfill", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # both processes' tokens counted: each step covers what the one process saw with twice the batch
    single_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    single_steps = [r for r in single_rows if "loss" in r]
    assert [(r["tokens"], r["loss_tokens"]) for r in steps] == [(r["tokens"], r["loss_tokens"]) for r in single_steps]
    assert all(r["loss_tokens"] > 0 for r in steps)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in steps]), torch.tensor(single.losses), rtol=1e-4, atol=1e-5)
    for part in ("loss_ce", "loss_kd") if "loss" in run else ():  # the logged parts are global means too
        torch.testing.assert_close(torch.tensor([r[part] for r in steps]), torch.tensor([r[part] for r in single_steps]),
                                   rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "overfill.json").read_text())["training"]["mode"] == run["mode"]


def test_standalone_baselines_also_learn_the_first_reply_token(setup):
    """The pruned and full baselines pick their own first token at generation, so they train on it too;
    the OverFill decoder does not (the full model picks it). Validation scores tokens 2..N in every mode."""
    from overfill.train.loss import first_scored

    tok = tiny_tokenizer()
    batch = collate(load_examples(setup["data"], tok).examples[:3], pad_id=0)
    model = tiny_model("llama")
    whole, n_whole = batch_loss("pruned", model, batch)
    rest, n_rest = batch_loss("pruned", model, batch, training=False)
    assert n_whole == n_rest + 3 and n_rest == standalone_loss(model, batch)[1]
    # token 1's loss by hand: the prediction at each row's last context token
    with torch.no_grad():
        logits = model(input_ids=batch.context_ids, attention_mask=batch.context_mask,
                       position_ids=(batch.context_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    first = torch.nn.functional.cross_entropy(logits, batch.target_ids[:, 0], reduction="sum")
    torch.testing.assert_close(whole * n_whole, rest * n_rest + first, rtol=1e-5, atol=1e-5)
    assert (first_scored("overfill", training=True), first_scored("pruned", training=True),
            first_scored("full", training=False)) == (1, 0, 1)


@pytest.mark.parametrize("bad, flag", [(dict(lr=math.inf), "--lr"), (dict(lr=math.nan), "--lr"),
                                       (dict(weight_decay=math.nan), "--weight-decay"), (dict(weight_decay=math.inf), "--weight-decay"),
                                       (dict(max_grad_norm=math.nan), "--max-grad-norm"), (dict(epochs=math.inf), "--epochs"),
                                       (dict(epochs=math.nan), "--epochs")])
def test_training_numbers_are_checked_for_their_range_not_for_being_negative(bad, flag):
    """NaN and infinity compare False with everything: a check that looks for negative values lets them through."""
    with pytest.raises(OverfillError, match=flag):
        TrainConfig(decoder="dec", data="data.jsonl", out="out", **bad)
