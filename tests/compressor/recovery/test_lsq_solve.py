"""The ridge solve behind lsq: the factored solver equals plain solves, and it survives non-PD input."""

from __future__ import annotations

import torch

from compressor.recovery import lsq_solve


def _reference_relu_solve(x, y, w_old, alpha, relu):
    """The ReLU-aware ridge solve written with one general solve per round."""
    g = (x.transpose(1, 2) @ x).double()
    lam = lsq_solve._ridge(g, alpha)
    lhs = g + lam * torch.eye(g.shape[-1], dtype=g.dtype)
    w = torch.linalg.solve(lhs, (x.transpose(1, 2) @ y).double() + lam * w_old)
    theta, sign, free = relu
    for _ in range(lsq_solve.RELU_ROUNDS):
        pred = x @ w.float()
        target = torch.where(free, torch.where(sign * (pred - theta) > 0, theta, pred), y)
        w = torch.linalg.solve(lhs, (x.transpose(1, 2) @ target).double() + lam * w_old)
    return w


def test_relu_aware_solve_matches_plain_solves():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 600, 40, generator=gen)
    y = x @ torch.randn(2, 40, 6, generator=gen) + 0.1 * torch.randn(2, 600, 6, generator=gen)
    w_old = torch.randn(2, 40, 6, generator=gen).double()
    relu = (torch.zeros(2, 600, 6), torch.ones(2, 1, 6), torch.rand(2, 600, 6, generator=gen) < 0.3)
    w, info = lsq_solve._solve(x, y, w_old, fast=True, relu=relu)
    expected = _reference_relu_solve(x, y, w_old, info["alpha"], relu)
    assert torch.allclose(w, expected, rtol=1e-5, atol=1e-7)


def test_ridge_solver_falls_back_when_the_factorization_fails():
    g = torch.diag(torch.tensor([4.0, 1.0, -50.0], dtype=torch.float64)).unsqueeze(0)  # not PD even with the ridge
    w_old = torch.ones(1, 3, 2, dtype=torch.float64)
    b = torch.arange(6, dtype=torch.float64).reshape(1, 3, 2)
    w = lsq_solve._ridge_solver(g, 1e-2, w_old)(b)
    lam = lsq_solve._ridge(g, 1e-2)
    lhs = g + lam * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(lhs @ w, b + lam * w_old)
