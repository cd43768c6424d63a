"""The suite's uninitialised-memory poison is on: a launcher that skips a store shows NaN."""
import torch


def test_empty_outputs_are_nan_in_tests():
    assert torch.isnan(torch.empty(5)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 3))).all()
    assert torch.isnan(torch.zeros(4).new_empty((2, 2))).all()
    assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integer tensors are left alone


def test_a_launcher_that_skips_a_store_is_caught():
    """What the poison is for: an output filled except for one row must not pass as finite."""
    def partial_copy(x):
        out = torch.empty_like(x)
        out[:-1] = x[:-1]  # forgets the last row
        return out
    x = torch.randn(4, 3)
    assert not torch.isfinite(partial_copy(x)).all()
