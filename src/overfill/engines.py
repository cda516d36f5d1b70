"""What runs a command's models: our own PyTorch loop or vLLM. The one place the names live, so configs
in every stage package share them without importing the vLLM integration."""

from __future__ import annotations

import typing
from typing import Literal

from overfill.errors import OverfillError

Engine = Literal["torch", "vllm"]
EngineOrAuto = Literal["auto", Engine]  # distill and demo: auto = vLLM where it is installed, else torch


def check_engine(value: str, allowed=Engine, flag: str = "--engine") -> str:
    choices = typing.get_args(allowed)
    if value not in choices:
        raise OverfillError(f"{flag} got unknown engine '{value}': pick one of {', '.join(choices)}")
    return value
