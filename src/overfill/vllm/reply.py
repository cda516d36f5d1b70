"""One client reply from two instances' answers: token 1 of every choice, then each choice's decode stream, joined.

Streamed as chunks or gathered whole, in the completions or chat format the client asked for; stop
strings across the seam (handoff.StopScanner), logprobs with their text offsets counted from the
reply's start, and usage across the seam. The HTTP to the instances is router.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from overfill.vllm.handoff import (
    FirstToken,
    Refused,
    StopScanner,
    Unavailable,
    completion_to_chat_logprobs,
    join_logprobs,
    rest_request,
    usage,
)


class Reply:
    """One client reply: token 1 of every choice, then each choice's decode stream, joined."""

    def __init__(self, stream_rest, body: dict, chat: bool, jobs: list, firsts: list[FirstToken], prefixes: list[str], *,
                 model: str):
        # stream_rest(request): the decode instance's chunks for one decode request (router.Router.stream_rest)
        self.stream_rest, self.body, self.chat, self.jobs, self.firsts = stream_rest, body, chat, jobs, firsts
        self.prefixes = prefixes  # each choice's prompt text, with echo
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
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
        async with contextlib.aclosing(self.stream_rest(request)) as chunks:
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
