import pytest
import torch

import gsops
from dense import paired_sigma, perm_matrix, sigma


def test_spec_pinned_example():
    # SPEC: k = 3, n = 12: P x = [x0 x3 x6 x9 x1 x4 x7 x10 x2 x5 x8 x11]
    x = torch.arange(12.0)
    expected = torch.tensor([0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11], dtype=torch.float32)
    assert torch.equal(gsops.permute(x, 3), expected)
    assert torch.equal(gsops.permute(expected, 3, inverse=True), x)


@pytest.mark.parametrize("k,n", [(1, 5), (3, 12), (4, 12), (6, 12), (2, 12), (5, 35), (7, 7), (16, 64)])
def test_perm_is_sigma_and_inverse(k, n):
    s = gsops.perm(k, n)
    assert s.dtype == torch.long
    assert s.tolist() == sigma(k, n)
    t = gsops.perm(n // k, n)
    assert torch.equal(s[t], torch.arange(n))
    assert torch.equal(t[s], torch.arange(n))


@pytest.mark.parametrize("k,n", [(3, 12), (4, 12), (5, 15), (1, 6), (8, 8)])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3)])
def test_permute_matches_matrix(k, n, lead):
    x = torch.randn(*lead, n, dtype=torch.float64)
    P = torch.from_numpy(perm_matrix(k, n))
    torch.testing.assert_close(gsops.permute(x, k), x @ P.T, rtol=0, atol=0)
    torch.testing.assert_close(gsops.permute(x, k, inverse=True), x @ P, rtol=0, atol=0)


@pytest.mark.parametrize("k,n", [(2, 8), (4, 16), (3, 12), (1, 4), (5, 30)])
def test_paired_perm(k, n):
    s = gsops.paired_perm(k, n)
    assert s.tolist() == paired_sigma(k, n)
    assert sorted(s.tolist()) == list(range(n))
    # perm(k, n // 2) acting on pairs (2j, 2j+1)
    pair = sigma(k, n // 2)
    for i in range(n):
        assert s[i] == 2 * pair[i // 2] + i % 2


def test_perm_result_is_a_copy():
    s = gsops.perm(3, 12)
    s[0] = 99
    assert gsops.perm(3, 12)[0] == 0


def test_default_device_context_does_not_poison_the_cache():
    with torch.device("meta"):
        gsops.perm(5, 35)
        gsops.paired_perm(2, 44)
    assert gsops.perm(5, 35).device.type == "cpu"
    assert gsops.perm(5, 35).tolist() == sigma(5, 35)
    assert gsops.paired_perm(2, 44).tolist() == paired_sigma(2, 44)
