"""The side-effect guard's nesting (guard.py) and the one-thread block of the small-tensor code (metrics/_common):
a forward-only block inside a forward-only guard of the same module takes no second snapshot, and everything is
still restored when the outer guard exits; anything else still gets its own guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_saliency.guard import RNGState, SideEffectGuard
from lightning_saliency.metrics._common import _evaluating, _one_thread


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()


def test_a_forward_only_block_nested_in_a_forward_only_guard_of_the_same_module_takes_no_second_snapshot(monkeypatch):
    net = _net()
    captures = []
    real = RNGState.capture
    monkeypatch.setattr(RNGState, "capture", classmethod(lambda cls: captures.append(1) or real()))
    before = torch.random.get_rng_state()
    with SideEffectGuard(net, enable_grad=False):
        assert SideEffectGuard.covers(net) and len(captures) == 1
        with _evaluating(net):
            assert len(captures) == 1 and not torch.is_grad_enabled() and not net.training
            net(torch.ones(1, 4))
            torch.rand(3)  # a draw inside the nested block: undone by the outer guard
            net[0].train()  # a flag flipped inside: restored by the outer guard
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(torch.random.get_rng_state(), before) and not SideEffectGuard.covers(net)


def test_every_other_block_gets_its_own_guard():
    net, other = _net(), _net()
    with SideEffectGuard(net):  # gradients on: not forward-only, covers nothing
        assert not SideEffectGuard.covers(net)
    with SideEffectGuard(net, enable_grad=False):
        assert not SideEffectGuard.covers(other)  # another module, even one inside a wrapper, is not covered
        with _evaluating(other):
            assert not other.training
        assert other.training
    with pytest.raises(RuntimeError):
        with SideEffectGuard(net, enable_grad=False):
            raise RuntimeError("boom")
    assert not SideEffectGuard.covers(net) and net.training  # left on an error too


def test_the_one_thread_block_restores_the_thread_count_also_on_errors():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), _one_thread():
            raise ValueError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
