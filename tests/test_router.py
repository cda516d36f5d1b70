"""The router against stand-in instances: one reply joined from a prefill answer and a decode stream.

The stand-ins speak vLLM's OpenAI protocol over one-character tokens (token id = code point, 0 = EOS):
the "full model" picks token 1 by one rule, the "decoder" every later token by another, so a joined
reply is right only if token 1 came from the prefill instance, the rest from the decode instance on
prompt + token 1, and the seam left no trace. Real engines: tests/test_disaggregated.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from overfill.vllm import KEY, LAYOUT, LOADED, STORE
from overfill.vllm.handoff import FirstToken, StopScanner, first_request, join_logprobs, rest_request
from overfill.vllm.router import Router, make_app

P, D = "http://prefill:1", "http://decode:2"
EOS = 0


def full_next(ids):  # the stand-in full model: token 1
    return EOS if sum(ids) % 97 == 0 else ord("a") + sum(ids) % 26


def decoder_next(ids):  # the stand-in decoder: every later token
    return ord("a") + (3 * sum(ids) + len(ids)) % 26


def tokens(text):
    return [ord(c) for c in text]


def text_of(ids):
    return "".join(chr(i) for i in ids if i != EOS)


def expected(prompt_ids, max_tokens):
    out = [full_next(prompt_ids)]
    while out[-1] != EOS and len(out) < max_tokens:
        out.append(decoder_next(prompt_ids + out))
    return out


class Instances:
    """Both stand-ins behind one httpx transport; `down` takes one away, `calls` counts what each was asked."""

    def __init__(self):
        self.down: set[str] = set()
        self.calls = {P: [], D: []}
        self.stores: dict[str, list[int]] = {}
        self.layout = {"layers": 2, "kv_heads": 1, "head_dim": 8, "dtype": "float32", "block_size": 16}
        self.fail_mid_stream = False
        self.store = True  # False: a prefill instance without OverFill's connector

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in self.down:
            raise httpx.ConnectError("refused", request=request)
        body = json.loads(request.content) if request.content else {}
        self.calls[base].append((request.url.path, body))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "full" if base == P else "decoder"}]})
        if request.url.path == "/detokenize":
            return httpx.Response(200, json={"prompt": text_of(body["tokens"])})
        return self.prefill(body, request.url.path) if base == P else self.decode(body)

    def prefill(self, body, path):
        assert body["max_tokens"] == 1 and body["model"] == "full" and not body.get("stream")
        prompt = tokens("".join(m["content"] for m in body["messages"])) if "messages" in body else (
            body["prompt"] if isinstance(body["prompt"], list) else tokens(body["prompt"]))
        if len(prompt) > 40:
            return httpx.Response(400, json={"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}})
        token = full_next(prompt)
        params = body.get("kv_transfer_params") or {}
        kv = None
        if STORE in params and self.store:
            key = f"{len(self.stores):04x}"
            self.stores[key] = prompt
            kv = {KEY: key, "tokens": len(prompt)}
        if LAYOUT in params:
            kv = {LAYOUT: self.layout}
        finish = "stop" if token == EOS else "length"
        logprobs = {"tokens": [chr(token)], "token_logprobs": [-0.5], "top_logprobs": [None], "text_offset": [0]} \
            if body.get("logprobs") is not None and "messages" not in body else None
        choice = {"index": 0, "token_ids": [token], "finish_reason": finish, "stop_reason": None, "logprobs": logprobs}
        if "messages" in path or "messages" in body:
            choice["message"] = {"role": "assistant", "content": text_of([token])}
        else:
            choice["text"] = text_of([token])
        answer = {"choices": [choice], "prompt_token_ids": prompt, "kv_transfer_params": kv,
                  "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1}}
        if not body.get("return_token_ids"):  # as vLLM: token ids only when asked for
            del answer["prompt_token_ids"], choice["token_ids"]
        return httpx.Response(200, json=answer)

    def decode(self, body):
        if LAYOUT in (body.get("kv_transfer_params") or {}):
            return httpx.Response(200, json={"choices": [{"text": "x", "token_ids": [120], "finish_reason": "length"}],
                                             "kv_transfer_params": {LAYOUT: self.layout}})
        key = body["kv_transfer_params"][KEY]
        prompt = body["prompt"]
        assert self.stores.pop(key) == prompt[:-1], "the decode request must carry its own prompt's key"
        if self.fail_mid_stream:
            sse = f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x', 'token_ids': [120]}]})}\n\n" \
                  f"data: {json.dumps({'error': {'message': 'engine died', 'code': 500}})}\n\n"
            return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
        out, finish, stop = [], "length", None
        stops = body.get("stop") or []
        while len(out) < body["max_tokens"]:
            out.append(decoder_next(prompt + out))
            hit = next((s for s in stops if s in text_of(out)), None)
            if hit:
                finish, stop = "stop", hit
                break
        text = text_of(out)
        if stop:
            text = text[:text.index(stop)]
        if not body.get("stream"):
            logprobs = {"tokens": [chr(t) for t in out], "token_logprobs": [-1.0] * len(out), "top_logprobs": [None] * len(out),
                        "text_offset": list(range(len(out)))} if body.get("logprobs") is not None else None
            return httpx.Response(200, json={"choices": [{"text": text, "token_ids": out, "finish_reason": finish,
                                                          "stop_reason": stop, "logprobs": logprobs}],
                                             "kv_transfer_params": {LOADED: len(prompt) - 1}})
        lines = []
        for i, token in enumerate(out):
            last = i == len(out) - 1
            piece = text_of([token]) if not last or not stop else text[len(text_of(out[:i])):]
            logprobs = {"tokens": [chr(token)], "token_logprobs": [-1.0], "top_logprobs": [None], "text_offset": [i]} \
                if body.get("logprobs") is not None else None
            lines.append({"choices": [{"index": 0, "text": piece, "token_ids": [token], "logprobs": logprobs,
                                       "finish_reason": finish if last else None, "stop_reason": stop if last else None}]})
        lines.append({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out)}})
        sse = "".join(f"data: {json.dumps(line)}\n\n" for line in lines) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture
def served():
    instances = Instances()
    router = Router([P], [D], name="overfill", transport=httpx.MockTransport(instances))
    asyncio.run(router.check())
    asyncio.run(router.close())
    instances.calls = {P: [], D: []}  # what clients' requests ask of them, from here on
    with TestClient(make_app(router)) as client:
        yield instances, client


def events(response):
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_reply_is_token_1_from_the_full_model_then_the_decoder(served):
    instances, client = served
    answer = client.post("/v1/completions", json={"model": "overfill", "prompt": "hello", "max_tokens": 6,
                                                  "return_token_ids": True}).json()
    want = expected(tokens("hello"), 6)
    assert answer["choices"][0]["token_ids"] == want and answer["choices"][0]["text"] == text_of(want)
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert instances.calls[D][-1][1]["max_tokens"] == 5 and not instances.stores  # the store was loaded once


def test_streaming_sends_token_1_first_then_the_decoder_and_usage(served):
    _, client = served
    with client.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 6, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as response:
        response.read()
    chunks = events(response)
    want = expected(tokens("hello"), 6)
    assert chunks[0]["choices"][0]["text"] == chr(want[0])  # the full model's token, before any decoding
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text_of(want)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_tokens_1_and_2_ends_the_reply(served, stream, include):
    _, client = served
    want = text_of(expected(tokens("hello"), 6))
    stop = want[0:2]  # begins in token 1's text, ends in the decoder's: neither instance sees it whole
    response = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "stop": [stop], "stream": stream,
                                                     "include_stop_str_in_output": include})
    if stream:
        chunks = events(response)
        text, last = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]
    else:
        last = response.json()["choices"][0]
        text = last["text"]
    assert text == (stop if include else "") and last["finish_reason"] == "stop" and last["stop_reason"] == stop


def test_eos_as_token_1_and_a_one_token_reply_never_reach_the_decoder(served):
    instances, client = served
    prompt = "a"  # code point 97: the stand-in full model's EOS
    assert full_next(tokens(prompt)) == EOS
    answer = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8}).json()
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["choices"][0]["text"] == ""
    one = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1}).json()
    assert one["choices"][0]["text"] == chr(full_next(tokens("hello"))) and one["usage"]["completion_tokens"] == 1
    assert not any(path == "/v1/completions" and KEY in (body.get("kv_transfer_params") or {})
                   for path, body in instances.calls[D])
    assert STORE not in (instances.calls[P][-1][1].get("kv_transfer_params") or {})  # nothing stored for a 1-token reply


def test_n_choices_and_a_batch_of_prompts_each_get_their_index_and_seed(served):
    instances, client = served
    answer = client.post("/v1/completions", json={"prompt": ["hello", "world"], "n": 2, "max_tokens": 4, "seed": 7}).json()
    texts = {c["index"]: c["text"] for c in answer["choices"]}
    assert texts == {0: text_of(expected(tokens("hello"), 4)), 1: text_of(expected(tokens("hello"), 4)),
                     2: text_of(expected(tokens("world"), 4)), 3: text_of(expected(tokens("world"), 4))}
    seeds = sorted(body["seed"] for path, body in instances.calls[P] if "prompt" in body and body["prompt"] == "hello")
    assert seeds == [7, 8]  # choice j of a seeded request: seed + j, on both instances
    assert answer["usage"]["prompt_tokens"] == 10 and answer["usage"]["completion_tokens"] == 16


def test_chat_replies_and_logprobs_are_joined_in_the_clients_format(served):
    _, client = served
    answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}],
                                                       "max_tokens": 5}).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == text_of(expected(tokens("hey"), 5))
    plain = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "logprobs": 0}).json()
    logprobs = plain["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == [-0.5, -1.0, -1.0, -1.0] and logprobs["text_offset"] == [0, 1, 2, 3]


def test_echo_puts_the_prompt_before_the_reply(served):
    _, client = served
    answer = client.post("/v1/completions", json={"prompt": tokens("hello"), "max_tokens": 3, "echo": True}).json()
    assert answer["choices"][0]["text"] == "hello" + text_of(expected(tokens("hello"), 3))


def test_errors_pass_through_and_a_missing_instance_is_a_503_until_it_is_back(served, monkeypatch):
    import time

    import overfill.vllm.router as router_module

    monkeypatch.setattr(router_module, "RETRY_DOWN_S", 0.2)  # how long a lost instance is skipped
    instances, client = served
    refused = client.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 3})
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "prompt too long"
    assert client.post("/v1/completions", json={"model": "other", "prompt": "hi"}).status_code == 404
    instances.down.add(D)
    down = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    assert down.status_code == 503 and "decode" in down.json()["error"]["message"]
    prefills = len(instances.calls[P])
    streamed = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "stream": True})
    assert streamed.status_code == 503  # known down: refused at once, no prompt read (and stored) for nothing
    assert len(instances.calls[P]) == prefills
    instances.down.discard(D)
    time.sleep(0.25)
    assert client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3}).status_code == 200


def test_what_two_instances_cannot_serve_as_one_is_refused_and_bad_answers_are_502(served):
    instances, client = served
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hey"}],
                                                        "response_format": {"type": "json_object"}})
    assert refused.status_code == 400 and "response_format" in refused.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "min_tokens": 2}).status_code == 200
    instances.store = False  # restarted without the connector: a reply must not silently stop at token 1
    lost = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    assert lost.status_code == 502 and "stored no KV" in lost.json()["error"]["message"]
    instances.store, instances.fail_mid_stream = True, True
    streamed = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "stream": True})
    assert events(streamed)[-1]["error"]["message"] == "engine died"  # the failure reaches the client, then the end
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3}).status_code == 500


def test_a_decode_instance_that_cannot_read_the_store_is_refused_at_start():
    instances = Instances()

    async def blind(request):  # the decode instance finds no store: it would read every prompt itself
        if request.url.host == "decode" and KEY in (json.loads(request.content or b"{}").get("kv_transfer_params") or {}):
            return httpx.Response(200, json={"choices": [{"text": "x", "token_ids": [120], "finish_reason": "length"}]})
        return await instances(request)

    from overfill.errors import OverfillError

    with pytest.raises(OverfillError, match="cannot load what"):
        asyncio.run(Router([P], [D], name="overfill", transport=httpx.MockTransport(blind)).check())


def test_instances_with_different_kv_layouts_are_refused_at_start():
    instances = Instances()

    async def other(request):
        answer = await instances(request)
        if request.url.host == "decode" and LAYOUT in (json.loads(request.content or b"{}").get("kv_transfer_params") or {}):
            return httpx.Response(200, json={"choices": [{}], "kv_transfer_params": {LAYOUT: {**instances.layout, "dtype": "bfloat16"}}})
        return answer

    router = Router([P], [D], name="overfill", transport=httpx.MockTransport(other))
    from overfill.errors import OverfillError

    with pytest.raises(OverfillError, match="dtype float32 vs bfloat16"):
        asyncio.run(router.check())


def test_stop_scanner_holds_back_only_what_may_begin_a_stop():
    scanner = StopScanner(["xyz"])
    assert scanner.feed("abx") == "ab"  # "x" may begin "xyz"
    assert scanner.feed("q") == "xq"
    assert scanner.feed("xy") == "" and scanner.feed("z") == "" and scanner.matched == "xyz"
    assert StopScanner(["xyz"]).feed("abx", final=True) == "abx"


def test_requests_for_each_instance():
    body = {"prompt": "hi", "max_tokens": 5, "min_tokens": 3, "n": 2, "stream": True, "seed": 4, "echo": True,
            "stop": ["."], "logprobs": 2}
    first = first_request(body, 1)
    assert first["max_tokens"] == 1 and first["n"] == 1 and first["stream"] is False and first["seed"] == 5
    assert "echo" not in first and first["return_token_ids"] and first["stop"] == ["."]
    token = FirstToken(prompt_ids=[1, 2], token_id=9, text="a", finish_reason="length", stop_reason=None, logprobs=None,
                       kv={KEY: "00ff", "tokens": 2})
    rest = rest_request(body, token, 1, chat=False)
    assert rest["prompt"] == [1, 2, 9] and rest["max_tokens"] == 4 and rest["min_tokens"] == 2 and rest["seed"] == 5
    assert rest["kv_transfer_params"] == token.kv and rest["logprobs"] == 2 and rest["stream"] is True
    assert first["min_tokens"] == 1  # vLLM refuses min_tokens > max_tokens: the rest is the decode instance's
    joined = join_logprobs({"tokens": ["a"], "token_logprobs": [-1], "top_logprobs": [None], "text_offset": [0]},
                           [{"tokens": ["b"], "token_logprobs": [-2], "top_logprobs": [None], "text_offset": [0]}], offset=1)
    assert joined["text_offset"] == [0, 1] and joined["tokens"] == ["a", "b"]


def test_a_router_key_is_required_of_clients_and_bodies_must_be_json():
    instances = Instances()
    router = Router([P], [D], name="overfill", transport=httpx.MockTransport(instances))
    with TestClient(make_app(router, api_key="sekrit")) as client:
        assert client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 401
        router.prefill.instances[0].name, router.decode.instances[0].name = "full", "decoder"
        ok = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == text_of(expected(tokens("hello"), 2))
        garbled = client.post("/v1/completions", content=b"{not json", headers={"Authorization": "Bearer sekrit"})
        assert garbled.status_code == 400
