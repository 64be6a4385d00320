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
