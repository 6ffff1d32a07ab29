"""Placement decisions and the block streamer's bookkeeping (on the CPU: dtype changes make real copies, and
the asynchronous mode runs the same worker thread CUDA uses, without streams)."""

import pytest
import torch
from torch import nn

from taylorprune.modeling.placement import GIB, Placement, choose_placement, model_bytes
from taylorprune.modeling.streaming import Streamer


class Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.lin.weight  # one Parameter in two places
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        return self.tied(self.lin(x)) * self.scale


def blocks(n=3):
    return nn.ModuleList(Block(i) for i in range(n))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_hold_computes_on_copies_and_restores_the_originals_bit_for_bit(asynchronous):
    stack = blocks()
    before = snapshot(stack)
    params = [id(p) for p in stack.parameters()]
    stack[0].lin.weight.requires_grad_(True)
    streamer = Streamer("cpu", asynchronous=asynchronous)
    x = torch.randn(2, 4, dtype=torch.float64)
    with streamer.hold(stack[0], torch.float64, write=False, prefetch=stack[1]) as block:
        assert block.lin.weight.dtype == torch.float64 and block.scale.dtype == torch.float64
        assert block.tied.weight is block.lin.weight and block.lin.weight.requires_grad
        with torch.no_grad():
            block.lin.weight.mul_(0)  # a read-only hold never writes this back
        out = block(x)
    assert out.dtype == torch.float64 and torch.all(out == 0)
    after = snapshot(stack)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
    assert [id(p) for p in stack.parameters()] == params and stack[0].lin.weight.requires_grad
    streamer.close()


def test_write_copies_changes_back_in_the_stored_dtype():
    stack = blocks(1)
    streamer = Streamer("cpu")
    with streamer.hold(stack[0], torch.float64, write=True) as block, torch.no_grad():
        block.lin.weight.fill_(0.5)
        block.lin.bias.add_(1.0)
    assert stack[0].lin.weight.dtype == torch.float32 and torch.all(stack[0].lin.weight == 0.5)
    assert torch.all(stack[0].tied.weight == 0.5)


def test_nothing_is_copied_when_the_module_is_already_there():
    stack = blocks(2)
    pointers = [p.data_ptr() for p in stack.parameters()]
    streamer = Streamer("cpu", asynchronous=True)
    with streamer.hold(stack[0], prefetch=stack[1]):
        assert [p.data_ptr() for p in stack.parameters()] == pointers
    assert streamer._pool is None  # no copies, so no worker thread either


def test_prefetched_copies_are_used_once_and_a_dtype_change_restages():
    stack = blocks(3)
    streamer = Streamer("cpu", asynchronous=True)
    ids = [id(b) for b in stack]
    with streamer.hold(stack[0], torch.float64, write=False, prefetch=stack[1]):
        pass
    with streamer.hold(stack[1], torch.float64, write=False, prefetch=stack[2]):
        pass
    assert streamer.log == [("stage", ids[0]), ("hold", ids[0]), ("stage", ids[1]), ("release", ids[0]),
                            ("hold", ids[1]), ("stage", ids[2]), ("release", ids[1])]
    with streamer.hold(stack[2], torch.float16, write=False):  # staged in float64: dropped, staged again
        assert stack[2].lin.weight.dtype == torch.float16
    assert streamer.log[-4:] == [("discard", ids[2]), ("stage", ids[2]), ("hold", ids[2]), ("release", ids[2])]
    streamer.close()


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_a_sweep_keeps_at_most_two_blocks_on_the_device(order):
    stack = blocks(5)
    streamer = Streamer("cpu", asynchronous=True)
    visit = list(range(5)) if order == "forward" else list(range(4, -1, -1))
    alive, peak = set(), 0
    for k, i in enumerate(visit):
        nxt = stack[visit[k + 1]] if k + 1 < len(visit) else None
        with streamer.hold(stack[i], torch.float64, write=False, prefetch=nxt):
            alive = set(streamer._held) | set(streamer._staged)
            peak = max(peak, len(alive))
    assert peak == 2 and not streamer._staged and not streamer._held
    assert [e for e in streamer.log if e[0] == "stage"] == [("stage", id(stack[i])) for i in visit]
    streamer.close()


def test_an_error_inside_a_hold_still_restores_the_module():
    stack = blocks(1)
    before = snapshot(stack)
    streamer = Streamer("cpu")
    with pytest.raises(RuntimeError, match="boom"), streamer.hold(stack[0], torch.float64, write=False):
        raise RuntimeError("boom")
    after = snapshot(stack)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)


def test_placement_follows_the_budget_and_the_flags():
    stack = blocks(2)
    size = model_bytes(stack)
    assert size == 2 * (16 + 4 + 4) * 4  # the tied weight counts once
    cpu = torch.device("cpu")
    assert choose_placement(stack, cpu).mode == "resident"
    assert choose_placement(stack, cpu, stream=True).mode == "stream"
    capped = choose_placement(stack, cpu, max_gpu_memory=size / GIB)  # 90% of the cap is usable: too small
    assert capped.mode == "stream" and "exceed" in capped.reason and "--max-gpu-memory" in capped.reason
    roomy = choose_placement(stack, cpu, max_gpu_memory=2 * size / GIB, working_bytes=size // 2)
    assert roomy.mode == "resident" and roomy.fits(size // 2) and not roomy.fits(size)
    assert choose_placement(stack, cpu, max_gpu_memory=2 * size / GIB, working_bytes=size).mode == "stream"
    stack.hf_device_map = {"": "cpu"}
    assert choose_placement(stack, cpu, stream=True).mode == "device_map"
    assert Placement("stream", cpu, "x", size).describe()["mode"] == "stream"
