"""The solve behind lsq: the factored solver equals plain solves, it survives non-PD input, and patches are exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.recovery import lsq_solve


def _reference_relu_solve(x, y, w_old, alpha, relu):
    """The ReLU-aware ridge solve written with one general solve per round."""
    g = (x.transpose(1, 2) @ x).double()
    lam = lsq_solve._ridge(g, alpha)
    lhs = g + lam * torch.eye(g.shape[-1], dtype=g.dtype)
    w = torch.linalg.solve(lhs, (x.transpose(1, 2) @ y).double() + lam * w_old)
    theta, sign, free = relu
    for _ in range(lsq_solve.RELU_ROUNDS):
        pred = x @ w.to(x.dtype)
        target = torch.where(free, torch.where(sign * (pred - theta) > 0, theta, pred), y)
        w = torch.linalg.solve(lhs, (x.transpose(1, 2) @ target).double() + lam * w_old)
    return w


@pytest.mark.parametrize("samples", [600, 30])  # 30 < 40 unknowns: the dual (kernel) form
def test_relu_aware_solve_matches_plain_solves(samples):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, samples, 40, generator=gen)
    y = x @ torch.randn(2, 40, 6, generator=gen) + 0.1 * torch.randn(2, samples, 6, generator=gen)
    w_old = torch.randn(2, 40, 6, generator=gen).double()
    relu = (torch.zeros(2, samples, 6), torch.ones(2, 1, 6), torch.rand(2, samples, 6, generator=gen) < 0.3)
    w, info = lsq_solve._solve(x, y, w_old, fast=True, relu=relu)
    assert info.get("dual", False) == (samples < 40)
    if samples < 40:  # the dual form works in float64 throughout; so does its reference
        x, y, relu = x.double(), y.double(), (relu[0].double(), relu[1].double(), relu[2])
    expected = _reference_relu_solve(x, y, w_old, info["alpha"], relu)
    assert torch.allclose(w, expected, rtol=1e-5, atol=1e-7)


def test_dual_form_picks_the_ridge_the_gram_form_would_and_fits_better_than_the_old_weights():
    """Fewer positions than unknowns: every candidate ridge solved in dual form equals the Gram-form solve
    on the training positions, so the held-out choice is the same; the result beats the old weights there."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 50, 120, generator=gen)
    w_true = torch.randn(1, 120, 4, generator=gen)
    y = x @ w_true
    w_old = (w_true + 0.5 * torch.randn(1, 120, 4, generator=gen)).double()
    w, info = lsq_solve._solve(x, y, w_old)
    assert info["dual"] and w is not None
    hold = torch.zeros(50, dtype=torch.bool)
    hold[::lsq_solve.HOLDOUT_EVERY] = True
    xt, yt, xh, yh = x[:, ~hold].double(), y[:, ~hold].double(), x[:, hold].double(), y[:, hold].double()
    g = xt.transpose(1, 2) @ xt
    errs = {}
    for alpha in lsq_solve.ALPHAS:
        lam = lsq_solve._ridge(g, alpha)
        wa = torch.linalg.solve(g + lam * torch.eye(120, dtype=g.dtype), xt.transpose(1, 2) @ yt + lam * w_old)
        errs[alpha] = float(((xh @ wa - yh) ** 2).sum())
    assert info["alpha"] == min(errs, key=errs.get)
    assert info["err_after"] < info["err_before"]
    lam = lsq_solve._ridge(g + xh.transpose(1, 2) @ xh, info["alpha"])
    gram = x.double().transpose(1, 2) @ x.double()
    expected = torch.linalg.solve(gram + lam * torch.eye(120, dtype=gram.dtype), x.double().transpose(1, 2) @ y.double()
                                  + lam * w_old)
    assert torch.allclose(w, expected, rtol=1e-6, atol=1e-8)


def test_ridge_solver_falls_back_when_the_factorization_fails():
    g = torch.diag(torch.tensor([4.0, 1.0, -50.0], dtype=torch.float64)).unsqueeze(0)  # not PD even with the ridge
    w_old = torch.ones(1, 3, 2, dtype=torch.float64)
    b = torch.arange(6, dtype=torch.float64).reshape(1, 3, 2)
    w = lsq_solve._ridge_solver(g, 1e-2, w_old)(b)
    lam = lsq_solve._ridge(g, 1e-2)
    lhs = g + lam * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(lhs @ w, b + lam * w_old)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize(("kernel", "stride", "dilation", "padding", "groups"), [
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (3, 1, 2, 2, 4), ((3, 5), 2, 1, (1, 2), 2), (1, 1, 1, 0, 1), (3, 1, 1, "same", 1),
    (5, 1, 1, 3, 1),  # padding wider than the kernel's reach: whole padded rows and columns
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_patches_reproduce_the_convolution_at_sampled_positions(kernel, stride, dilation, padding, groups,
                                                                     padding_mode, channels_last):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 12, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups,
                     padding_mode=padding_mode)
    x = torch.randn(5, 8, 13, 11, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
    out_h, out_w = y.shape[-2:]
    flat = torch.randperm(5 * out_h * out_w, generator=gen)[:60].sort().values
    n, hw = flat // (out_h * out_w), flat % (out_h * out_w)
    patches = lsq_solve.conv_patches(conv, x, n, hw, out_w)  # S x groups x (Cin/groups * kh * kw)
    weight = conv.weight.detach().reshape(groups, 12 // groups, -1)
    rebuilt = torch.einsum("sgd,gcd->sgc", patches, weight).reshape(len(flat), 12) + conv.bias.detach()
    torch.testing.assert_close(rebuilt, y.flatten(2)[n, :, hw], atol=1e-5, rtol=1e-5)
