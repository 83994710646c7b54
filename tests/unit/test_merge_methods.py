"""The merge math of leantune.merge.methods, by the properties that define each method (the weights
PEFT computes are checked in tests/parity/test_merge_peft.py)."""

from __future__ import annotations

import pytest
import torch

from leantune.merge import methods as M


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_weighted_sum_negative_weight_negates_a_task():
    t, u = _rand(5, 7), _rand(5, 7, seed=1)
    torch.testing.assert_close(M.weighted_sum([t, u], [1.0, -1.0]), t - u)
    assert torch.count_nonzero(M.weighted_sum([t, t], [0.5, -0.5])) == 0


def test_concat_factors_is_the_exact_weighted_sum_and_ranks_add():
    a1, b1, a2, b2 = _rand(3, 8), _rand(6, 3, seed=1), _rand(5, 8, seed=2), _rand(6, 5, seed=3)
    a, b = M.concat_factors([a1, a2], [b1, b2], [0.5, -2.0], [2.0, 0.25])
    assert a.shape == (8, 8) and b.shape == (6, 8)
    torch.testing.assert_close(b @ a, 0.5 * 2.0 * b1 @ a1 - 2.0 * 0.25 * b2 @ a2)


def test_svd_factors_is_exact_at_full_rank_and_optimal_below_it():
    delta = _rand(6, 4) @ _rand(4, 9, seed=1)            # rank 4
    a, b = M.svd_factors(delta, 4)
    torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-4)
    s = torch.linalg.svdvals(delta)
    a2, b2 = M.svd_factors(delta, 2)                      # Eckart-Young: the residual is the tail's energy
    torch.testing.assert_close(torch.linalg.norm(delta - b2 @ a2), s[2:].norm(), rtol=1e-4, atol=1e-4)
    a8, b8 = M.svd_factors(delta, 8)                      # asking for more rank than exists pads with zeros
    assert a8.shape == (8, 9) and b8.shape == (6, 8)
    torch.testing.assert_close(b8 @ a8, delta, rtol=1e-4, atol=1e-4)


def test_keep_top_magnitude_keeps_the_largest_entries():
    t = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0, 0.0])
    torch.testing.assert_close(M.keep_top_magnitude(t, 0.5), torch.tensor([0.0, -5.0, 2.0, 0.0, 4.0, 0.0]))
    assert M.keep_top_magnitude(t, 1.0) is t


def test_random_drop_keeps_about_density_and_rescales_the_kept():
    t = torch.ones(200, 200)
    out = M.random_drop(t, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))


def test_ties_drops_entries_that_disagree_with_the_elected_sign():
    t1 = torch.tensor([1.0, -2.0, 3.0])
    t2 = torch.tensor([3.0, 1.0, -1.0])
    # signs elected from t1 + t2 = [4, -1, 2] -> [+, -, +]; agreeing entries are averaged, the others dropped
    torch.testing.assert_close(M.ties([t1, t2], [1.0, 1.0], density=1.0), torch.tensor([2.0, -2.0, 3.0]))


def test_split_weight_shares_weight_times_scale_between_the_factors_sign_on_a():
    wa, wb = M.split_weight(-0.5, 2.0)
    assert wa * wb == pytest.approx(-1.0) and wa < 0 < wb


def test_combine_factors_of_one_adapter_reproduces_its_update():
    a, b = _rand(4, 8), _rand(6, 4, seed=1)
    for method in M.TENSOR_METHODS:
        na, nb = M.combine_factors(method, [a], [b], [1.0], [0.5], density=1.0)
        torch.testing.assert_close(nb @ na, 0.5 * b @ a, msg=method)
