"""Token-level distillation in `overfill train` (--loss kd, ce+kd) on tiny random models.

KD must be the KL from the full model's next-token distributions (one pass over context + reply)
to the trained model's, at temperature T and scaled by T^2, on exactly the tokens CE scores;
zero when the decoder is the full model; mixed with CE as documented; learnable; resumable
exactly. The default --loss ce must stay plain cross-entropy.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import test_train
from overfill import OverfillError
from overfill.data import collate, load_examples
from overfill.modeling import OverFillModel, decode, prefill
from overfill.prune import PruneConfig, prune_model
from overfill.refresh import refresh_schedule
from overfill.train import train
from overfill.train.loop import micro_batch_loss
from overfill.train.loss import batch_loss
from test_train import Interrupt, config
from tiny import tiny_model, tiny_tokenizer

# test_train's fixtures: a tiny full model with attention dropout, a decoder pruned from it, data; one thread
setup, _one_thread = test_train.setup, test_train._one_thread


def pair_of(ratio: float) -> OverFillModel:
    """A tiny full model and a decoder pruned from it; ratio 0 keeps every channel (the decoder is the full model)."""
    full, tok = tiny_model("llama"), tiny_tokenizer()
    decoder = prune_model(full, tok, PruneConfig(ratio=ratio), progress=False).model
    return OverFillModel(full, decoder, tok).eval()


def batch_of(setup, n: int = 4):
    batch = collate(load_examples(setup["data"], tiny_tokenizer()).examples[:n], pad_id=0)
    # rows of different lengths: padding on both sides, which both losses must leave out
    assert (batch.context_mask == 0).any() and (batch.target_mask == 0).any()
    return batch


def loss_of(setup, pair: OverFillModel, batch, **kw):
    """micro_batch_loss as the loop calls it: through OverFillModel (overfill), or the decoder with the full model as teacher."""
    cfg = config(setup, "unused", **kw)
    if cfg.mode == "overfill":
        return micro_batch_loss(cfg, pair, batch)
    return micro_batch_loss(cfg, pair.decoder, batch, pair.full)


def predictions(model, batch) -> torch.Tensor:
    """A model's predictions of y1..yN from its own forward over context + reply, [B, N, V]."""
    ids = torch.cat([batch.context_ids, batch.target_ids[:, :-1]], dim=1)
    mask = torch.cat([batch.context_mask, batch.target_mask[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, batch.context_ids.shape[1] - 1:]


def trained_predictions(pair: OverFillModel, batch, mode: str) -> torch.Tensor:
    """The trained model's predictions, [B, N-first, V]: the decoder on a prefill of the context alone
    (overfill: y2..yN), or the decoder reading context + reply itself (pruned: y1..yN)."""
    with torch.no_grad():
        if mode == "overfill":
            _, cache = prefill(pair.full, batch.context_ids, batch.context_mask)
            mask = torch.cat([batch.context_mask, batch.target_mask[:, :-1]], dim=1)
            return decode(pair.decoder, batch.target_ids[:, :-1], mask, cache, start=batch.context_mask.sum(-1))
        return predictions(pair.decoder, batch)


def kd_by_hand(teacher: torch.Tensor, student: torch.Tensor, real: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * sum_v p log(p / q) at temperature T, averaged over the real tokens."""
    p = torch.softmax(teacher / t, dim=-1)
    q = torch.softmax(student / t, dim=-1)
    kl = (p * (p.log() - q.log())).sum(-1) * t * t  # [B, M]
    return kl[real].sum() / real.sum()


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_kd_by_hand_equals_the_training_loss(setup, mode):
    pair, batch, t = pair_of(0.5), batch_of(setup), 2.0
    first = 1 if mode == "overfill" else 0  # the OverFill decoder never predicts y1; the pruned baseline does
    teacher = predictions(pair.full, batch)[:, first:]
    real = batch.target_mask[:, first:].bool()
    expected = kd_by_hand(teacher, trained_predictions(pair, batch, mode), real, t)
    with torch.no_grad():
        loss, tokens, parts = loss_of(setup, pair, batch, mode=mode, loss="kd", kd_temperature=t)
    assert tokens == int(real.sum())
    assert expected > 0.05  # a pruned decoder is not the full model: a wrong teacher or mask would show
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(parts["kd"], loss)
    # ... and the logged CE is the plain CE of the same tokens
    torch.testing.assert_close(parts["ce"], batch_loss(mode, pair if mode == "overfill" else pair.decoder, batch)[0],
                               rtol=1e-5, atol=1e-6)


def test_kd_on_the_refresh_schedule_leaves_the_full_models_picks_out(setup):
    """With --refresh-every K the schedule's one full pass is the teacher; the full model's own picks are not the decoder's."""
    from overfill.refresh import refreshed_handoff

    pair, batch, every, t = pair_of(0.5), batch_of(setup), 2, 1.5
    with torch.no_grad():
        student = refreshed_handoff(pair.full, pair.decoder, batch.context_ids, batch.context_mask, batch.target_ids,
                                    batch.target_mask, every).rest
        loss, tokens, _ = loss_of(setup, pair, batch, loss="kd", kd_temperature=t, refresh_every=every)
    real = batch.target_mask[:, 1:].bool() & ~refresh_schedule(batch.target_ids.shape[1] - 1, every)[None, :]
    assert tokens == int(real.sum()) < int(batch.target_mask[:, 1:].sum())
    teacher = predictions(pair.full, batch)[:, 1:]
    torch.testing.assert_close(loss, kd_by_hand(teacher, student, real, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, refresh_every", [("overfill", 0), ("pruned", 0), ("overfill", 2)])
def test_kd_is_zero_when_the_decoder_is_the_full_model(setup, mode, refresh_every):
    batch = batch_of(setup)
    kw = dict(mode=mode, loss="ce+kd", kd_temperature=2.0, kd_weight=0.25, refresh_every=refresh_every)
    with torch.no_grad():
        same, _, parts = loss_of(setup, pair_of(0.0), batch, **kw)
        pruned = loss_of(setup, pair_of(0.5), batch, **kw)[2]["kd"]
    assert abs(float(parts["kd"])) < 1e-5 and pruned > 0.05
    torch.testing.assert_close(same, 0.75 * parts["ce"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_ce_plus_kd_mixes_as_documented(setup, mode):
    pair, batch = pair_of(0.5), batch_of(setup)
    pair.decoder.requires_grad_(True)
    kw = dict(mode=mode, kd_temperature=1.5)
    mixed, n, parts = loss_of(setup, pair, batch, loss="ce+kd", kd_weight=0.3, **kw)
    kd, n_kd, _ = loss_of(setup, pair, batch, loss="kd", **kw)
    ce, n_ce = batch_loss(mode, pair if mode == "overfill" else pair.decoder, batch)
    assert n == n_kd == n_ce
    torch.testing.assert_close(mixed, 0.7 * parts["ce"] + 0.3 * parts["kd"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["kd"], kd.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    # the gradient mixes the same way: both terms train the decoder, kd alone trains it through KD only
    weight = pair.decoder.get_output_embeddings().weight
    grads = [torch.autograd.grad(x, weight)[0] for x in (mixed, kd, ce)]
    torch.testing.assert_close(grads[0], 0.7 * grads[2] + 0.3 * grads[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[1], grads[2], atol=1e-4)


def test_the_default_loss_is_plain_cross_entropy(setup):
    pair, batch = pair_of(0.5), batch_of(setup)
    assert config(setup, "unused").loss == "ce"
    for mode in ("overfill", "pruned"):
        with torch.no_grad():
            loss, tokens, parts = loss_of(setup, pair, batch, mode=mode)
            module = pair if mode == "overfill" else pair.decoder
            plain, plain_tokens = batch_loss(mode, module, batch)
        assert parts == {} and torch.equal(loss, plain) and tokens == plain_tokens
        # cross-entropy by hand on the tokens each mode scores
        first = 1 if mode == "overfill" else 0
        logits = trained_predictions(pair, batch, mode)
        real = batch.target_mask[:, first:].bool()
        by_hand = F.cross_entropy(logits[real], batch.target_ids[:, first:][real])
        torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
        assert tokens == int(real.sum())


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_training_with_kd_lowers_kd(setup, tmp_path, mode):
    before = OverFillModel.from_pair(setup["full"], setup["decoder"]).eval()
    batch = batch_of(setup)
    kw = dict(mode=mode, loss="kd", kd_temperature=2.0)
    with torch.no_grad():
        start = float(loss_of(setup, before, batch, **kw)[0])
    result = train(config(setup, tmp_path / "kd", max_steps=8, eval_every=4, **kw))
    after = result.model.eval()
    with torch.no_grad():
        end = float(loss_of(setup, after, batch, **kw)[0])
    assert end < 0.8 * start, f"{mode}: kd {start:.3f} -> {end:.3f}"
    for name, tensor in before.full.state_dict().items():  # the teacher is frozen
        assert torch.equal(tensor, after.full.state_dict()[name]), name
    rows = _rows(result.out / "metrics.jsonl")
    steps, val = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) and [r["step"] for r in val] == [0, 4, 8]
    for r in steps:  # --loss kd optimises KD alone; CE is logged beside it
        assert r["loss"] == pytest.approx(r["loss_kd"], rel=1e-9) and math.isfinite(r["loss_ce"])
    # validation is still the CE of tokens 2..N, whatever the training loss: it drops as the decoder learns
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert json.loads((result.out / "overfill.json").read_text())["training"]["config"]["loss"] == "kd"


def test_ce_plus_kd_run_logs_both_parts_and_ce_runs_log_neither(setup, tmp_path):
    mixed = train(config(setup, tmp_path / "mixed", max_steps=2, loss="ce+kd", kd_weight=0.2))
    for r in (r for r in _rows(mixed.out / "metrics.jsonl") if "loss" in r):
        assert r["loss"] == pytest.approx(0.8 * r["loss_ce"] + 0.2 * r["loss_kd"], rel=1e-6)
    plain = train(config(setup, tmp_path / "plain", max_steps=2))
    assert not any("loss_kd" in r or "loss_ce" in r for r in _rows(plain.out / "metrics.jsonl"))
    # both start from the same decoder, so their first validation (CE, tokens 2..N) is the same number
    assert mixed.val_losses[0] == plain.val_losses[0]


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_a_resumed_kd_run_continues_exactly(setup, tmp_path, mode):
    kw = dict(mode=mode, loss="ce+kd", kd_temperature=2.0, kd_weight=0.7, max_steps=6, checkpoint_every=2,
              eval_every=3, grad_accum=2, batch_size=2)
    whole = train(config(setup, tmp_path / "whole", **kw))

    def stop_at_5(record):
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(setup, tmp_path / "cut", **kw), on_step=stop_at_5)
    resumed = train(config(setup, tmp_path / "cut", resume="latest", **kw))
    assert resumed.losses == whole.losses and resumed.val_losses == whole.val_losses
    parts = [[(r["loss_ce"], r["loss_kd"]) for r in _rows(run.out / "metrics.jsonl") if "loss" in r] for run in (whole, resumed)]
    assert parts[0] == parts[1]
    for (name, a), (resumed_name, b) in zip(whole.model.decoder.state_dict().items(),
                                            resumed.model.decoder.state_dict().items(), strict=True):
        assert resumed_name == name and torch.equal(a, b), name
    for changed, flag in ((dict(loss="kd"), "--loss"), (dict(kd_temperature=1.0), "--kd-temperature"),
                          (dict(kd_weight=0.5), "--kd-weight")):
        with pytest.raises(OverfillError, match=flag):
            train(config(setup, tmp_path / "cut", resume="latest", **{**kw, **changed}))


def test_checkpoints_older_than_the_loss_flags_resume_as_ce(setup, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2)
    whole = train(config(setup, tmp_path / "run", **kw))
    meta_path = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    for name in ("loss", "kd_temperature", "kd_weight"):  # as a checkpoint written before these flags existed
        del meta["config"][name]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(OverfillError, match="--loss 'ce', this run has 'kd'"):
        train(config(setup, tmp_path / "run", resume="latest", loss="kd", **kw))
    resumed = train(config(setup, tmp_path / "run", resume="latest", **kw))
    assert resumed.losses == whole.losses


@pytest.mark.parametrize("bad, message", [
    (dict(loss="mse"), "--loss got unknown loss 'mse'"),
    (dict(kd_temperature=0.0), "--kd-temperature must be a positive number"),
    (dict(kd_temperature=-1.0), "--kd-temperature must be a positive number"),
    (dict(kd_temperature=math.nan), "--kd-temperature must be a positive number"),
    (dict(kd_weight=1.5), "--kd-weight must be in [0, 1]"),
    (dict(kd_weight=-0.1), "--kd-weight must be in [0, 1]"),
    (dict(mode="full", loss="kd"), "would distil from itself"),
])
def test_bad_kd_settings_are_refused_in_one_line(setup, bad, message):
    with pytest.raises(OverfillError) as err:
        config(setup, "unused", **bad)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--kd-temperature", "0"], "--kd-temperature must be a positive number, got 0.0"),
    (["--loss", "ce+kd", "--kd-weight", "2"], "--kd-weight must be in [0, 1]"),
    (["--loss", "kd", "--mode", "full"], "would distil from itself"),
])
def test_bad_kd_flags_exit_with_code_2(monkeypatch, capsys, setup, tmp_path, flags, message):
    from test_cli import assert_one_line_error, run_cli  # the CLI loads every command's module: only here

    decoder = [] if "full" in flags else ["--decoder", setup["decoder"]]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", setup["full"], *decoder, "--data", setup["data"],
                           "--out", str(tmp_path / "out"), *flags)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()
