"""GaLore against the paper's algorithm written out step by step, and its state: tensors only, low-rank
(the run that trains with it is in tests/e2e/test_optimizer_runs.py)."""

from __future__ import annotations

import io

import pytest
import torch

from leantune.config import from_dict
from leantune.errors import ConfigError
from leantune.train.galore import GaLoreAdamW
from leantune.train.memory import optimizer_state_bytes


def paper_galore(w0, grads, *, rank, gap, scale, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Zhao et al. 2024, Algorithm 2 (GaLore with Adam), for one matrix, with decoupled weight decay."""
    w = w0.clone()
    m_rows, n_cols = w.shape
    M = V = P = None
    for t, G in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:rank, :] if m_rows >= n_cols else U[:, :rank]
        R = G @ P.T if m_rows >= n_cols else P.T @ G
        M = (1 - betas[0]) * R if M is None else betas[0] * M + (1 - betas[0]) * R
        V = (1 - betas[1]) * R * R if V is None else betas[1] * V + (1 - betas[1]) * R * R
        M_hat, V_hat = M / (1 - betas[0] ** t), V / (1 - betas[1] ** t)
        N = M_hat / (V_hat.sqrt() + eps)
        G_tilde = scale * (N @ P if m_rows >= n_cols else P @ N)
        w = w * (1 - lr * wd) - lr * G_tilde
    return w


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])  # right- and left-side projection
def test_galore_steps_match_the_paper_algorithm(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [p], "galore": True, "rank": 4, "update_proj_gap": 2, "scale": 0.25}],
                      lr=1e-2, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = paper_galore(w0, grads, rank=4, gap=2, scale=0.25, lr=1e-2, wd=0.1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)


def test_galore_state_is_low_rank_tensors_that_survive_a_weights_only_checkpoint():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256, 128))
    group = {"params": [p], "galore": True, "rank": 8, "update_proj_gap": 10, "scale": 0.25}
    opt = GaLoreAdamW([group], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].shape == (256, 8) and state["projection"].shape == (8, 128)
    assert optimizer_state_bytes(opt) < 0.1 * 2 * p.numel() * 4  # vs AdamW's two full fp32 moments
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = GaLoreAdamW([dict(group)], lr=1e-3)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.state[p]["projection"], state["projection"])


def test_galore_needs_a_full_weight_method():
    with pytest.raises(ConfigError, match="method full or freeze"):
        from_dict({"model": "m", "data": {"path": "d"}, "train": {"optimizer": "galore_adamw"}})

