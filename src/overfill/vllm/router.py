"""`overfill router`: one OpenAI endpoint in front of prefill instances (the full model) and decode instances (the decoder).

Per choice of a request: the prefill instance reads the prompt and answers token 1 (the full model's
head) with the key of the prompt's stored KV; the router streams that token at once and asks a
decode instance to go on from prompt + token 1, which loads the prompt's KV (kv_connector.py) and
decodes with the decoder. handoff.py shapes both requests and joins the answers; this module does
the HTTP: picking instances (round robin or least loaded), passing a 4xx through as the instance
gave it, answering 503 while no instance of a kind is up (and serving again once one is back),
and checking at start that every instance shares one KV layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from overfill.errors import OverfillError
from overfill.vllm import LAYOUT, LOADED, STORE
from overfill.vllm.handoff import (
    FirstToken,
    StopScanner,
    check_supported,
    completion_to_chat_logprobs,
    first_request,
    join_logprobs,
    max_new,
    rest_request,
    usage,
)

POLICIES = ("round-robin", "least-loaded")
RETRY_DOWN_S = 2.0  # an instance that did not answer is skipped this long, then tried again
# A reply may wait in an instance's queue for a while, but not forever: a peer gone without a reset ends here.
TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=None)
LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=256)  # every streaming reply holds one
NOT_REACHED = (httpx.ConnectError, httpx.ConnectTimeout)
NIXL_STORE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
              "remote_host": None, "remote_port": None}  # as vLLM's own disaggregation proxies ask


class Unavailable(Exception):
    """No instance of a kind answers: the client gets a 503."""


class BadAnswer(Exception):
    """An instance answered, but not as OverFill's connector and vLLM do: the client gets a 502."""


class Refused(Exception):
    """An instance answered with an error status: the client gets it as it was."""

    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body


@dataclass
class Instance:
    url: str
    name: str = ""  # the model name it serves
    in_flight: int = 0
    down_until: float = 0.0


@dataclass
class Pool:
    """The instances of one kind (prefill or decode) and how the next one is picked."""

    kind: str
    instances: list[Instance]
    policy: str = "round-robin"
    _turn: itertools.count = field(default_factory=itertools.count)

    def all_down(self) -> bool:
        now = time.monotonic()
        return all(i.down_until > now for i in self.instances)

    def candidates(self) -> list[Instance]:
        now = time.monotonic()
        up = [i for i in self.instances if i.down_until <= now] or list(self.instances)  # all down: try them anyway
        if self.policy == "least-loaded":
            return sorted(up, key=lambda i: i.in_flight)
        start = next(self._turn) % len(up)
        return up[start:] + up[:start]


class Router:
    def __init__(self, prefill: list[str], decode: list[str], *, name: str, policy: str = "round-robin",
                 transport: httpx.AsyncBaseTransport | None = None, transport_kind: str = "files",
                 instance_api_key: str | None = None):
        if policy not in POLICIES:
            raise OverfillError(f"--policy {policy}: pick {' or '.join(POLICIES)}")
        self.prefill = Pool("prefill", [Instance(u.rstrip("/")) for u in prefill], policy)
        self.decode = Pool("decode", [Instance(u.rstrip("/")) for u in decode], policy)
        self.name = name
        self._client: httpx.AsyncClient | None = None
        self._transport = transport  # tests answer for the instances
        self.auth = {"Authorization": f"Bearer {instance_api_key}"} if instance_api_key else {}
        # What the prefill request asks of its connector: OverFill's store, or NIXL's hand-off to a decode instance.
        self.store_params = {STORE: True} if transport_kind == "files" else NIXL_STORE

    @property
    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop: made in the loop that serves."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS, transport=self._transport)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- start: names and KV layouts ----

    async def check(self) -> dict:
        """Every instance's model name and KV layout; one error if an instance is down or the layouts differ (with
        NIXL, names only: its handshake compares the layouts)."""
        layouts = {}
        for pool in (self.prefill, self.decode):
            for instance in pool.instances:
                try:
                    models = (await self.client.get(f"{instance.url}/v1/models", headers=self.auth)).json()
                    instance.name = models["data"][0]["id"]
                    if STORE not in self.store_params:
                        continue
                    answer = await self.client.post(f"{instance.url}/v1/completions", headers=self.auth, json={
                        "model": instance.name, "prompt": [0], "max_tokens": 1, "kv_transfer_params": {LAYOUT: True}})
                    layout = (answer.json().get("kv_transfer_params") or {}).get(LAYOUT)
                except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
                    raise OverfillError(f"the {pool.kind} instance {instance.url} does not answer as vLLM does "
                                        f"({type(error).__name__}): start it, or check the URL") from None
                if layout is None:
                    raise OverfillError(f"the {pool.kind} instance {instance.url} runs without OverFill's KV connector: "
                                        "start it with `overfill serve --kv-role` (or vLLM's --kv-transfer-config)")
                layouts[instance.url] = layout
        if not layouts:
            return {}
        first_url, first = next(iter(layouts.items()))
        for url, layout in layouts.items():
            if layout != first:
                differ = ", ".join(f"{k} {first.get(k)} vs {layout.get(k)}" for k in sorted(first) if first.get(k) != layout.get(k))
                raise OverfillError(f"{first_url} and {url} keep different KV layouts ({differ}): serve the full model "
                                    "and its decoder in one dtype and block size")
        await self._round_trip()
        return first

    async def _round_trip(self) -> None:
        """One prompt through every prefill and decode instance pair: the store must reach each decode instance
        (a --kv-path it cannot see would leave every prompt to the decoder, silently)."""
        for prefill in self.prefill.instances:
            for decode in self.decode.instances:
                first = FirstToken.from_answer((await self.client.post(f"{prefill.url}/v1/completions", headers=self.auth, json={
                    "model": prefill.name, "prompt": [0, 1, 2], "max_tokens": 1, "return_token_ids": True,
                    "kv_transfer_params": dict(self.store_params)})).json(), chat=False)
                answer = (await self.client.post(f"{decode.url}/v1/completions", headers=self.auth, json={
                    "model": decode.name, "prompt": first.prompt_ids + [first.token_id], "max_tokens": 1,
                    "kv_transfer_params": first.kv})).json()
                if (answer.get("kv_transfer_params") or {}).get(LOADED) != len(first.prompt_ids):
                    raise OverfillError(f"the decode instance {decode.url} cannot load what {prefill.url} stores: start "
                                        "both with one --kv-path they can both read (or use --kv-transport nixl)")

    # ---- one request ----

    async def handle(self, body: dict, chat: bool) -> Response:
        if body.get("model") not in (None, self.name):
            return _error(404, f"The model `{body['model']}` does not exist: this router serves `{self.name}`.", "NotFoundError")
        if self.decode.all_down() and max_new(body) != 1:  # no prompt read (and stored) for a reply nobody can finish
            return _error(503, f"no decode instance answers ({', '.join(i.url for i in self.decode.instances)}): the "
                          "router serves again as soon as one is up", "ServiceUnavailableError")
        try:
            check_supported(body)
            jobs = _choices(body, chat)
            firsts = await asyncio.gather(*(self._first(payload, offset, chat) for payload, offset in jobs))
            prefixes = await asyncio.gather(*(self._echo(payload, first) for (payload, _), first in zip(jobs, firsts))) \
                if body.get("echo") and not chat else [""] * len(jobs)
        except (Refused, Unavailable, BadAnswer) as failure:
            return _failed(failure)
        except ValueError as bad:
            return _error(400, str(bad), "BadRequestError")
        reply = Reply(self, body, chat, jobs, firsts, prefixes)
        if body.get("stream"):
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        try:
            return JSONResponse(await reply.whole())
        except (Refused, Unavailable, BadAnswer) as failure:
            return _failed(failure)

    async def _first(self, payload: dict, offset: int, chat: bool) -> FirstToken:
        request = first_request(payload, offset)
        if max_new(payload) != 1:  # a reply of one token is the prefill instance's alone: nothing to store
            request["kv_transfer_params"] = dict(self.store_params)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        answer = await self._post(self.prefill, path, request)
        try:
            first = FirstToken.from_answer(answer, chat)
            first.last = max_new(payload) == 1
        except (KeyError, IndexError, TypeError) as error:
            raise BadAnswer(f"the prefill instance's answer has no {error}: is it vLLM 0.32 or newer?") from None
        if not first.ends_reply and not first.kv:
            raise BadAnswer("the prefill instance stored no KV for the prompt: start it with `overfill serve --role prefill`")
        return first

    async def _echo(self, payload: dict, first: FirstToken) -> str:
        """The prompt's text, for echo: the prompt itself, or the prefill instance's reading of its token ids."""
        if isinstance(payload.get("prompt"), str):
            return payload["prompt"]
        return (await self._post(self.prefill, "/detokenize", {"tokens": first.prompt_ids}))["prompt"]

    async def _post(self, pool: Pool, path: str, request: dict) -> dict:
        for instance in pool.candidates():
            instance.in_flight += 1
            try:
                answer = await self.client.post(instance.url + path, json={**request, "model": instance.name}, headers=self.auth)
            except NOT_REACHED:  # never reached the instance: another may take the request
                instance.down_until = time.monotonic() + RETRY_DOWN_S
                continue
            except httpx.TransportError as error:  # reached it, then lost it: retrying could run the request twice
                instance.down_until = time.monotonic() + RETRY_DOWN_S
                raise Unavailable(f"the {pool.kind} instance {instance.url} stopped answering ({type(error).__name__})") from None
            finally:
                instance.in_flight -= 1
            if answer.status_code >= 400:
                raise Refused(answer.status_code, answer.content)
            return answer.json()
        raise Unavailable(f"no {pool.kind} instance answers ({', '.join(i.url for i in pool.instances)}): "
                          "start one; the router serves again as soon as one is up")

    async def stream_rest(self, request: dict) -> AsyncIterator[dict]:
        """The decode instance's chunks, parsed; the request is aborted when the caller stops reading."""
        for instance in self.decode.candidates():
            instance.in_flight += 1
            try:
                async with self.client.stream("POST", instance.url + "/v1/completions", headers=self.auth,
                                              json={**request, "model": instance.name}) as answer:
                    if answer.status_code >= 400:
                        raise Refused(answer.status_code, await answer.aread())
                    async for line in answer.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[len("data: "):])
                            if "error" in chunk:  # vLLM reports a failure mid-stream as an event
                                raise Refused(int(chunk["error"].get("code") or 500), json.dumps(chunk).encode())
                            yield chunk
                    return
            except NOT_REACHED:
                instance.down_until = time.monotonic() + RETRY_DOWN_S
                continue
            except httpx.TransportError as error:  # went down mid-reply: nothing to retry on
                instance.down_until = time.monotonic() + RETRY_DOWN_S
                raise Unavailable(f"the decode instance {instance.url} stopped answering mid-reply ({type(error).__name__})") from None
            finally:
                instance.in_flight -= 1
        raise Unavailable(f"no decode instance answers ({', '.join(i.url for i in self.decode.instances)}): "
                          "start one; the router serves again as soon as one is up")


def _choices(body: dict, chat: bool) -> list[tuple[dict, int]]:
    """One (request, seed offset) per choice: every prompt of a completions batch times n."""
    n = int(body.get("n") or 1)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if chat:
        return [(body, j) for j in range(n)]
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    return [({**body, "prompt": p}, j) for p in batch for j in range(n)]


class Reply:
    """One client reply: token 1 of every choice, then each choice's decode stream, joined."""

    def __init__(self, router: Router, body: dict, chat: bool, jobs: list, firsts: list[FirstToken], prefixes: list[str]):
        self.router, self.body, self.chat, self.jobs, self.firsts = router, body, chat, jobs, firsts
        self.prefixes = prefixes  # each choice's prompt text, with echo
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = body.get("model") or router.name
        self.prompt_tokens = sum(len(f.prompt_ids) for (payload, j), f in zip(jobs, firsts) if j == 0)
        self.completion_tokens = 0

    def _chunk(self, index: int, text: str, *, logprobs=None, finish: str | None = None, stop=None,
               token_ids=None, first: bool = False) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        if token_ids is not None and self.body.get("return_token_ids"):
            choice["token_ids"] = token_ids
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    async def _rest(self, index: int) -> AsyncIterator[tuple[str, object, list[int], str | None, object]]:
        """(text, logprobs, token ids, finish, stop) pieces of choice `index` after token 1, stop strings across the seam applied."""
        payload, offset = self.jobs[index]
        first = self.firsts[index]
        scanner = StopScanner.of(self.body)
        head = scanner.feed(first.text, final=first.ends_reply)
        logprobs = first.logprobs
        if first.ends_reply:
            self.completion_tokens += 1
            yield head, logprobs, [first.token_id], first.finish_reason, first.stop_reason
            return
        yield head, logprobs, [first.token_id], None, None
        self.completion_tokens += 1
        request = rest_request(payload, first, offset, chat=self.chat)
        shift = len(self.prefixes[index]) + len(first.text)  # the decoder's text offsets start after token 1's text
        # Streamed from the decode instance whatever the client asked: a stop string found here ends its request at once.
        async with contextlib.aclosing(self.router.stream_rest(request)) as chunks:
            async for chunk in chunks:
                if not chunk.get("choices"):
                    continue  # the usage chunk: tokens are counted from each chunk's ids
                choice = chunk["choices"][0]
                self.completion_tokens += len(choice.get("token_ids") or [])
                final = choice.get("finish_reason") is not None
                text = scanner.feed(choice.get("text") or "", final=final)
                logprobs, ids = _logprobs(choice.get("logprobs"), self.chat, shift), choice.get("token_ids")
                if scanner.matched is not None:
                    yield text, logprobs, ids, "stop", scanner.matched
                    return  # closing the stream aborts the decode instance's request
                if final:
                    yield text, logprobs, ids, choice["finish_reason"], choice.get("stop_reason")
                    return
                yield text, logprobs, ids, None, None
        # The stream ended without a finish (the instance closed it): what the scanner held back, then the end.
        yield scanner.feed("", final=True), None, [], "length", None

    async def stream(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            firsts = True
            try:
                async for text, logprobs, ids, finish, stop in self._rest(index):
                    text = self.prefixes[index] + text if firsts else text
                    await queue.put(self._chunk(index, text, logprobs=logprobs, finish=finish, stop=stop, token_ids=ids,
                                                first=firsts))
                    firsts = False
            except Refused as refused:
                await queue.put({"error": _refusal(refused)})
            except Unavailable as down:
                await queue.put({"error": {"message": str(down), "type": "ServiceUnavailableError", "code": 503}})
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.jobs))]
        try:
            open_choices = len(tasks)
            while open_choices:
                item = await queue.get()
                if item is None:
                    open_choices -= 1
                    continue
                yield f"data: {json.dumps(item)}\n\n".encode()
            if (self.body.get("stream_options") or {}).get("include_usage"):
                tail = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": usage(self.prompt_tokens, self.completion_tokens)}
                yield f"data: {json.dumps(tail)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()  # a client that went away stops the decode requests too

    async def whole(self) -> dict:
        async def one(index: int) -> dict:
            texts, logprobs, ids, finish, stop = [], [], [], None, None
            async for text, part, token_ids, finish, stop in self._rest(index):
                texts.append(text)
                logprobs.append(part)
                ids += token_ids or []
            text = self.prefixes[index] + "".join(texts)
            choice = {"index": index, "finish_reason": finish, "stop_reason": stop,
                      "logprobs": _joined(logprobs[0], logprobs[1:], self.chat)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if self.body.get("return_token_ids"):
                choice["token_ids"] = ids
            return choice

        choices = await asyncio.gather(*(one(i) for i in range(len(self.jobs))))
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": list(choices), "usage": usage(self.prompt_tokens, self.completion_tokens)}


def _logprobs(part, chat: bool, shift: int):
    """The decode instance's logprobs in the client's format, text offsets counted from the reply's start."""
    if part is None:
        return None
    if chat:
        return {"content": completion_to_chat_logprobs(part)}
    return {**part, "text_offset": [shift + o for o in part.get("text_offset") or []]}


def _joined(first, parts: list, chat: bool):
    """Token 1's logprobs, then the decode instance's (already in the client's format and offsets)."""
    if first is None:
        return None
    if chat:
        return {"content": [entry for part in (first, *parts) for entry in (part or {}).get("content") or []]}
    return join_logprobs(first, [p for p in parts if p])


def _refusal(refused: Refused) -> dict:
    try:
        return json.loads(refused.body).get("error") or {"message": refused.body.decode(errors="replace"), "code": refused.status}
    except ValueError:
        return {"message": refused.body.decode(errors="replace"), "code": refused.status}


def _failed(failure: Exception) -> Response:
    """The client's answer when an instance refused, was missing, or answered unlike vLLM."""
    if isinstance(failure, Refused):  # the instance's own error, as it gave it
        return Response(failure.body, status_code=failure.status, media_type="application/json")
    if isinstance(failure, Unavailable):
        return _error(503, str(failure), "ServiceUnavailableError")
    return _error(502, str(failure), "BadGatewayError")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def make_app(router: Router, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="OverFill router")

    if api_key:
        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "Unauthorized: pass the router's key as `Authorization: Bearer KEY`", "AuthenticationError")
            return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"prefill": [i.url for i in router.prefill.instances], "decode": [i.url for i in router.decode.instances]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": router.name, "object": "model", "owned_by": "overfill"}]}

    async def body_of(request: Request) -> dict | Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "BadRequestError")
        return body if isinstance(body, dict) else _error(400, "the request body is not a JSON object", "BadRequestError")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        return body if isinstance(body, Response) else await router.handle(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await body_of(request)
        return body if isinstance(body, Response) else await router.handle(body, chat=True)

    return app
