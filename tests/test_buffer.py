import pytest
import torch

from core.training.buffer import ShuffleBuffer


def test_each_row_comes_out_exactly_once():
    buffer = ShuffleBuffer(dim=2, capacity=8, seed=0)
    rows = torch.arange(40.0).reshape(20, 2)
    buffer.add(rows[:12])
    first = buffer.take(5)
    buffer.add(rows[12:])
    rest = [buffer.take(4) for _ in range(4)]
    assert len(buffer) == 0
    out = torch.cat([first, *rest])
    assert sorted(out[:, 0].tolist()) == rows[:, 0].tolist()
    assert not torch.equal(out, rows)  # shuffled


def test_non_finite_rows_are_dropped_and_counted():
    buffer = ShuffleBuffer(dim=3, capacity=4)
    rows = torch.ones(6, 3)
    rows[1, 0] = float("nan")
    rows[4, 2] = float("inf")
    buffer.add(rows)
    assert (len(buffer), buffer.skipped) == (4, 2)
    assert torch.isfinite(buffer.take(10)).all()


def test_restored_buffer_hands_out_the_same_batches():
    a = ShuffleBuffer(dim=4, capacity=16, seed=3)
    a.add(torch.randn(30, 4))
    a.take(7)
    b = ShuffleBuffer(dim=4, capacity=16, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.take(6), b.take(6))


def test_rows_of_the_wrong_width_are_refused():
    buffer = ShuffleBuffer(dim=4, capacity=16)
    with pytest.raises(ValueError, match="expected rows of width 4"):
        buffer.add(torch.zeros(3, 5))
