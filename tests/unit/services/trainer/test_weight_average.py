"""weight_average.py's maths: the warmed-up decay, the in-place EMA, the swap that restores."""

from __future__ import annotations

import pytest
import torch

from services.trainer.weight_average import WeightAverage, average_decay, ema_update_, swapped_in


def test_average_decay_warms_up_then_caps():
    # (1 + t) / (10 + t): 2/11 at the first update, 0.9 at t = 80, capped by beta after that.
    assert average_decay(0.98, 1) == pytest.approx(2 / 11)
    assert average_decay(0.98, 80) == pytest.approx(0.9)
    assert average_decay(0.98, 10_000) == 0.98
    assert average_decay(0.5, 5) == pytest.approx(6 / 15) and average_decay(0.3, 5) == 0.3
    with pytest.raises(ValueError, match="decay"):
        average_decay(1.0, 1)
    with pytest.raises(ValueError, match="updates"):
        average_decay(0.9, 0)


def test_ema_update_is_the_equation_and_copies_integer_tensors():
    avg = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    ema_update_(avg, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([7])}, beta=0.75)
    assert torch.allclose(avg["w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]))
    assert avg["n"].item() == 7
    with pytest.raises(ValueError, match="different tensors"):
        ema_update_(avg, {"w": torch.zeros(2)}, beta=0.5)


def test_weight_average_of_a_constant_sequence_is_that_constant_and_lags_a_ramp():
    theta = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    average = WeightAverage(theta, decay=0.9)
    assert average.tensors["w"].dtype == torch.float32  # the small steps are not rounded away
    for t in range(1, 51):
        theta["w"].fill_(float(t))
        average.update(theta)
    value = float(average.tensors["w"][0])
    assert average.updates == 50
    assert 25.0 < value < 50.0  # behind the last iterate, ahead of the plain mean of 0..50
    same = WeightAverage({"w": torch.full((2,), 4.0)}, decay=0.9)
    for _ in range(20):
        same.update({"w": torch.full((2,), 4.0)})
    assert torch.equal(same.tensors["w"], torch.full((2,), 4.0))


def test_load_refuses_another_layout():
    average = WeightAverage({"w": torch.zeros(2)}, decay=0.9)
    average.load({"w": torch.ones(2)}, updates=7)
    assert average.updates == 7 and torch.equal(average.tensors["w"], torch.ones(2))
    with pytest.raises(ValueError, match="does not match"):
        average.load({"v": torch.ones(2)}, updates=1)
    with pytest.raises(ValueError, match="shape"):
        average.load({"w": torch.ones(3)}, updates=1)


def test_swapped_in_restores_the_weights_even_after_an_exception():
    module = torch.nn.Linear(2, 2)
    own = {k: v.clone() for k, v in module.state_dict().items()}
    other = {k: torch.full_like(v, 0.5) for k, v in own.items()}
    with swapped_in(module.state_dict(), other):
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items())
    assert all(torch.equal(v, own[k]) for k, v in module.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), swapped_in(module.state_dict(), other):
        raise RuntimeError("boom")
    assert all(torch.equal(v, own[k]) for k, v in module.state_dict().items())
