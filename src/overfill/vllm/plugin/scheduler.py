"""OverFill's vLLM scheduler: prompt steps and decode steps in turn, and prefix caching that tells the stages apart.

In an OverFill engine a prompt token goes through the full model and a reply token through the
decoder. vLLM's scheduler fills each step with the running requests' decode tokens first and new
prompt chunks after them, so on a busy server most steps hold both, and such a step runs the two
stages one after the other (model.py's split route). Every request in it then gets its token only
when both passes are done: a new request's first token waits for the decoder's pass over all the
running requests, and they wait for the full model's pass over the prompt. Mixing buys nothing here,
since the two passes share no weights: a mixed step costs the sum of its parts, plus rebuilding the
attention metadata of each. (For one model it is the other way round: a decode row added to a prompt
chunk's pass costs little, which is why vLLM mixes.)

So when prompts and decodes both wait, OverFill's scheduler gives a step one kind: prompt chunks (new
requests, prompts still being read in chunks, recomputes after preemption), then the decodes, then
prompts again. A new request's first token comes after the full model's pass alone; a running request
waits a prompt step plus a decode step for its next token, what one mixed step cost it; and neither
kind can starve the other. With only one kind waiting, a step is vLLM's as usual. A prompt step
that finds no room for its prompts (the KV cache full) runs empty: a scheduling pass, no forward.

How a request sits out one step: vLLM's own `next_decode_eligible_step` for a running request (its
diffusion scheduler holds requests back the same way), and for the waiting queue a zero cap on new
admissions during that one `schedule` call.

`--additional-config '{"overfill_steps": "mixed"}'` keeps vLLM's mixing (each mixed step then runs the
split route); the bench uses it to time the routes of a mixed step against each other.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.scheduler import Scheduler

from overfill.vllm.plugin.prefix_cache import PromptAwareHashing

SCHEDULER_FQCN = "overfill.vllm.plugin.scheduler.overfill_scheduler"
STEPS_KEY = "overfill_steps"  # in vLLM's additional_config
STEP_POLICIES = ("alternate", "mixed")
PROMPT_STEPS_KEY = "overfill_prompt_steps"
PROMPT_STEPS = 2  # prompt steps in a row at most, while decodes wait


def step_policy(vllm_config) -> str:
    """The engine's step policy: "alternate" (the default) or "mixed"; anything else is refused at engine start."""
    additional = vllm_config.additional_config
    policy = additional.get(STEPS_KEY, "alternate") if isinstance(additional, dict) else "alternate"
    if policy not in STEP_POLICIES:
        raise ValueError(f"OverFill: additional_config {STEPS_KEY}={policy!r}; use one of {', '.join(STEP_POLICIES)}")
    return policy


def prompt_steps(vllm_config) -> int:
    """How many prompt steps may run back to back while decodes wait (additional_config overfill_prompt_steps)."""
    additional = vllm_config.additional_config
    steps = additional.get(PROMPT_STEPS_KEY, PROMPT_STEPS) if isinstance(additional, dict) else PROMPT_STEPS
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"OverFill: additional_config {PROMPT_STEPS_KEY}={steps!r}; use a whole number of at least 1")
    return steps


class StagesInTurn:
    """Scheduler mixin: when prompt work and decodes both wait, a step takes one kind, in turn (the module says why)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = kwargs["vllm_config"]
        self.alternate_stages = step_policy(vllm_config) == "alternate"
        self.max_prompt_steps = prompt_steps(vllm_config)
        self.prompt_steps_in_row = 0

    def schedule(self, *args, **kwargs):
        if not self.alternate_stages:
            return super().schedule(*args, **kwargs)
        decoding, reading = [], []
        for request in self.running:
            (reading if request.num_computed_tokens < request.num_prompt_tokens else decoding).append(request)
        # waiting requests count only where one could start now (a free slot; new ones not paused)
        admissible = len(self.running) + self.num_waiting_for_streaming_input < self.max_num_active_reqs
        waiting = len(self.kv_holding_waiting) + (len(self.waiting) if self._pause_state == PauseState.UNPAUSED else 0)
        prompt_work = bool(reading or (admissible and waiting))
        read_prompts = prompt_work and (not decoding or self.prompt_steps_in_row < self.max_prompt_steps)
        self.prompt_steps_in_row = self.prompt_steps_in_row + 1 if read_prompts else 0
        if not (decoding and prompt_work):
            return super().schedule(*args, **kwargs)
        # schedule() counts this step first, then skips a request while current_step < its eligible step
        for request in (decoding if read_prompts else reading):
            request.next_decode_eligible_step = max(request.next_decode_eligible_step, self.current_step + 2)
        if read_prompts:
            return super().schedule(*args, **kwargs)
        admitted, self.max_num_active_reqs = self.max_num_active_reqs, 0  # a decode step admits no new request
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_active_reqs = admitted


class OverFillScheduler(StagesInTurn, PromptAwareHashing, Scheduler):
    pass


class OverFillAsyncScheduler(StagesInTurn, PromptAwareHashing, AsyncScheduler):
    pass


def overfill_scheduler(**kwargs):
    """What `--scheduler-cls` names: vLLM decides async scheduling after the config hook ran, so pick here."""
    async_scheduling = kwargs["vllm_config"].scheduler_config.async_scheduling
    return (OverFillAsyncScheduler if async_scheduling else OverFillScheduler)(**kwargs)


def engine_scheduler(llm):
    """The scheduler of an offline engine running in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def set_step_policy(llm, policy: str) -> None:
    """Switch an in-process OverFill engine between alternating and mixed steps (the bench and tests time and check both)."""
    if policy not in STEP_POLICIES:
        raise ValueError(f"step policy {policy!r}: use one of {', '.join(STEP_POLICIES)}")
    engine_scheduler(llm).alternate_stages = policy == "alternate"
