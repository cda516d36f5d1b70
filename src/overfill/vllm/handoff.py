"""One reply from two instances: what the router asks each, and how it joins their answers into one.

The prefill instance (the full model) is asked for exactly one token and returns it with the prompt's
token ids and the key of the prompt's stored KV; the decode instance (the decoder) is asked to go on
from prompt + that token. A client must not see the seam, so this module:
  * shapes both requests from the client's (`first_request`, `rest_request`): max_tokens, min_tokens,
    echo and seeds counted across the seam, the decode instance always given token ids;
  * finds stop strings that neither instance sees whole, one that begins in token 1's text and ends
    in the decoder's (`StopScanner`, which also holds back text that may yet start one, as vLLM does);
  * joins logprobs and usage, and turns the decode instance's completion logprobs into chat ones;
  * names the ways an instance can fail a reply (Unavailable, Refused, BadAnswer).
No I/O here: router.py does the HTTP, reply.py assembles the client's reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Unavailable(Exception):
    """No instance of a kind answers: the client gets a 503."""


class BadAnswer(Exception):
    """An instance answered, but not as OverFill's connector and vLLM do: the client gets a 502."""


class Refused(Exception):
    """An instance answered with an error status: the client gets it as it was."""

    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body


# What the router sets itself in the prefill request, or must not pass on to the decode instance.
_FIRST_ONLY = ("max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "kv_transfer_params", "echo")


@dataclass
class FirstToken:
    """The prefill instance's answer for one choice: token 1 and what the decode instance needs to go on."""

    prompt_ids: list[int]
    token_id: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: object  # completion-style dict, a chat-style {"content": [...]}, or None
    kv: dict | None  # kv_transfer_params: the stored prompt's key
    last: bool = False  # the client asked for one token

    @classmethod
    def from_answer(cls, answer: dict, chat: bool) -> FirstToken:
        choice = answer["choices"][0]
        text = (choice["message"].get("content") or "") if chat else (choice.get("text") or "")
        prompt_ids = answer.get("prompt_token_ids") or choice.get("prompt_token_ids")
        if not prompt_ids or not choice.get("token_ids"):
            raise KeyError("prompt_token_ids or token_ids")
        return cls(prompt_ids=list(prompt_ids), token_id=choice["token_ids"][0], text=text, finish_reason=choice.get("finish_reason"),
                   stop_reason=choice.get("stop_reason"), logprobs=choice.get("logprobs"),
                   kv=answer.get("kv_transfer_params"))

    @property
    def ends_reply(self) -> bool:
        """Token 1 was the last: EOS or a stop string, or a reply of one token."""
        return self.last or self.finish_reason not in (None, "length")


# Requests the decode instance cannot continue as one engine would: a grammar or format (it would restart after
# token 1) and chat's tool calls (the decode instance speaks completions).
UNSUPPORTED = ("tools", "tool_choice", "functions", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar", "guided_decoding_backend")


def check_supported(body: dict) -> None:
    """A ValueError (a 400 for the client) for what the two instances cannot serve as one."""
    asked = [key for key in UNSUPPORTED if body.get(key) not in (None, [], "none", "auto")]
    fmt = body.get("response_format")
    if fmt and (fmt.get("type") if isinstance(fmt, dict) else fmt) not in (None, "text"):
        asked.append("response_format")
    if asked:
        raise ValueError(f"{', '.join(asked)}: not served across prefill and decode instances (the decoder would not "
                         "continue it after token 1); send it to `overfill serve` without --disaggregated")


def max_new(body: dict) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return None if value is None else int(value)


def first_request(body: dict, seed_offset: int) -> dict:
    """The prefill instance's request for one choice: the client's, one token, not streamed, with token ids."""
    first = {k: v for k, v in body.items() if k not in _FIRST_ONLY}
    first.update(max_tokens=1, n=1, stream=False, return_token_ids=True)
    if body.get("min_tokens"):
        first["min_tokens"] = 1  # the rest is the decode instance's (vLLM refuses min_tokens > max_tokens)
    if body.get("seed") is not None:
        first["seed"] = int(body["seed"]) + seed_offset  # choice i of a seeded request: its own, repeatable, stream
    return first


def rest_request(body: dict, first: FirstToken, seed_offset: int, *, chat: bool) -> dict:
    """The decode instance's request: prompt + token 1 as token ids, the rest of the reply's budget."""
    rest = {k: v for k, v in body.items() if k not in (*_FIRST_ONLY, "messages", "prompt", "echo", "suffix",
                                                       "logprobs", "top_logprobs", "add_generation_prompt",
                                                       "chat_template", "chat_template_kwargs", "tools", "tool_choice",
                                                       "max_completion_tokens", "response_format", "user")}
    rest.update(prompt=first.prompt_ids + [first.token_id], stream=True, n=1, kv_transfer_params=first.kv,
                return_token_ids=True)
    if (limit := max_new(body)) is not None:
        rest["max_tokens"] = limit - 1
    if body.get("min_tokens"):
        rest["min_tokens"] = max(0, int(body["min_tokens"]) - 1)
    if body.get("seed") is not None:
        rest["seed"] = int(body["seed"]) + seed_offset
    if chat:
        if body.get("logprobs"):
            rest["logprobs"] = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        rest["logprobs"] = body["logprobs"]
    return rest


@dataclass
class StopScanner:
    """Stop strings over the joined reply. Each instance stops on a string it sees whole; one that begins in
    token 1's text and ends in the decoder's is found here. Text that may still begin a stop is held back."""

    stops: list[str]
    include: bool = False
    text: str = ""
    released: int = 0
    matched: str | None = None
    _seen: int = field(default=0, repr=False)

    @classmethod
    def of(cls, body: dict) -> StopScanner:
        stops = body.get("stop") or []
        return cls([stops] if isinstance(stops, str) else [s for s in stops if s],
                   bool(body.get("include_stop_str_in_output")))

    def feed(self, text: str, final: bool = False) -> str:
        """Reply text in; the text the client may have now (all of it once `final`, or once a stop matched)."""
        if self.matched is not None:
            return ""
        self.text += text
        match = self._earliest()
        if match is not None:
            start, stop = match
            self.matched, self.text = stop, self.text[:start + (len(stop) if self.include else 0)]
            final = True
        hold = 0 if final else self._possible_start()
        out = self.text[self.released:len(self.text) - hold]
        self.released += len(out)
        return out

    def _earliest(self) -> tuple[int, str] | None:
        found = [(at, stop) for stop in self.stops if (at := self.text.find(stop, max(0, self._seen - len(stop) + 1))) >= 0]
        self._seen = len(self.text)
        return min(found, key=lambda m: m[0] + len(m[1])) if found else None

    def _possible_start(self) -> int:
        """How many characters at the end could be the first of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return max(0, min(longest, len(self.text) - self.released))


def join_logprobs(first: dict | None, rest: list[dict], *, offset: int = 0) -> dict | None:
    """Completion logprobs: token 1's (prefill instance), then the decode instance's, whose text offsets start
    `offset` characters into the reply (after token 1's text)."""
    if first is None:
        return None
    joined = {key: list(first.get(key) or []) for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for part in rest:
        if not part:
            continue
        for key in ("tokens", "token_logprobs", "top_logprobs"):
            joined[key] += part.get(key) or []
        joined["text_offset"] += [offset + o for o in part.get("text_offset") or []]
    return joined


def completion_to_chat_logprobs(part: dict | None) -> list[dict]:
    """The decode instance's completion logprobs as chat logprob entries."""
    if not part:
        return []
    entries = []
    for token, logprob, top in zip(part.get("tokens") or [], part.get("token_logprobs") or [],
                                   part.get("top_logprobs") or [None] * len(part.get("tokens") or [])):
        entries.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                         for t, lp in (top or {}).items()]})
    return entries


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
