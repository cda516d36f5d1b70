
from overfill.chat import ChatSession
from overfill.generation import GenerationConfig, generate
from overfill.modeling import OverFillModel
from overfill.prune import PruneConfig, prune_model
from tiny import tiny_model, tiny_tokenizer


def overfill_pair():
    full, tok = tiny_model("llama"), tiny_tokenizer()
    decoder = prune_model(full, tok, PruneConfig(ratio=0.5), progress=False).model
    return OverFillModel(full, decoder, tok)


def count_full_tokens(model):
    seen = []
    handle = model.full.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return seen, handle


def test_second_turn_prefills_only_the_new_tokens_and_matches_a_fresh_run():
    model = overfill_pair()
    config = GenerationConfig(mode="overfill", max_new_tokens=6)
    session = ChatSession(model, config)
    session.say("hello")
    first_context = len(session.cached_ids)
    seen, handle = count_full_tokens(model)
    second = session.say("and again")
    handle.remove()
    total = len(session.cached_ids)
    # The full model ran once, over the previous reply + the new user turn only.
    assert seen == [total - first_context]
    # Same reply as answering the whole history from scratch.
    fresh = generate(model, session.messages[:-1], config)[0]
    assert second == fresh.text
    # The kept cache holds only prefill-model KV for the context, not the decoder's reply.
    assert session.cache.get_seq_length() == total


def test_reset_and_mode_switch_drop_the_cache():
    model = overfill_pair()
    session = ChatSession(model, GenerationConfig(mode="overfill", max_new_tokens=4))
    session.say("hi")
    session.set_mode("pruned")
    seen_decoder = []
    handle = model.decoder.register_forward_pre_hook(lambda _m, _a, kw: seen_decoder.append(kw["input_ids"].shape[1]), with_kwargs=True)
    session.say("next")
    handle.remove()
    # pruned mode re-encodes the whole history with the decoder: its cache had full-model KV
    assert seen_decoder[0] == len(session.cached_ids)
    session.reset()
    assert session.messages == [] and session.cached_ids == []


def test_an_abandoned_turn_leaves_no_unanswered_user_turn():
    model = overfill_pair()
    session = ChatSession(model, GenerationConfig(mode="overfill", max_new_tokens=4))
    session.say("hi")
    history = list(session.messages)
    stream = session.send("this one is cut off")
    next(stream)
    stream.close()  # the caller stops reading mid-reply
    assert session.messages == history
    reply = session.say("next")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert reply == generate(model, session.messages[:-1], GenerationConfig(mode="overfill", max_new_tokens=4))[0].text
