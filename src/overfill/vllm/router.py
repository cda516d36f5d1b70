"""`overfill router`: one OpenAI endpoint in front of prefill instances (the full model) and decode instances (the decoder).

Per choice of a request: the prefill instance reads the prompt and answers token 1 (the full model's
head) with the key of the prompt's stored KV; the router streams that token at once and asks a
decode instance to go on from prompt + token 1, which loads the prompt's KV (kv_connector.py) and
decodes with the decoder. handoff.py shapes both requests, reply.py joins the answers into the
client's reply; this module does the HTTP: picking instances (round robin or least loaded), passing a 4xx through as the instance
gave it, answering 503 while no instance of a kind is up (and serving again once one is back),
and checking at start that every instance shares one KV layout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from overfill.errors import OverfillError
from overfill.vllm import LAYOUT, LOADED, STORE
from overfill.vllm.handoff import BadAnswer, FirstToken, Refused, Unavailable, check_supported, first_request, max_new
from overfill.vllm.reply import Reply

POLICIES = ("round-robin", "least-loaded")
RETRY_DOWN_S = 2.0  # an instance that did not answer is skipped this long, then tried again
# A reply may wait in an instance's queue for a while, but not forever: a peer gone without a reset ends here.
TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=None)
LIMITS = httpx.Limits(max_connections=4096, max_keepalive_connections=256)  # every streaming reply holds one
NOT_REACHED = (httpx.ConnectError, httpx.ConnectTimeout)
NIXL_STORE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
              "remote_host": None, "remote_port": None}  # as vLLM's own disaggregation proxies ask


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
        reply = Reply(self.stream_rest, body, chat, jobs, firsts, prefixes, model=body.get("model") or self.name)
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
