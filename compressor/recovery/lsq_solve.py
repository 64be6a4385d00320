"""The least-squares solve behind ``lsq`` (and the sensitivity probes): one layer at sampled positions.

A layer's input patches at sampled output positions are regressed onto a target output with a
ridge in Gram form, ``W = (G + lam I)^-1 (B + lam W_old)``, ``G = X^T X`` (D x D, D = input
channels x kernel area / groups, +1 for the bias), ``B = X^T Y``: it shrinks toward the pruned
weights. ``lam`` is picked per layer from a few multiples of ``trace(G)/D`` on held-out positions,
and the old weights are kept when no solve beats them there. Grouped and depthwise convolutions
are solved per group.

When a layer has more unknowns than sampled positions (a linear layer after a flatten, e.g. VGG's
25,088 inputs fitted on one vector per image), the same ridge is solved in its dual form,
``W = W_old + X^T (X X^T + lam I)^-1 (Y - X W_old)``: an S x S system instead of a D x D Gram
matrix (5 GB in float64 for D = 25,089, which ran a 24 GB machine out of memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.recovery.common import set_bias

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
EIGH_MAX_DIM = 1200  # above this many unknowns per group: one fixed-ridge solve
LARGE_ALPHA = 0.1
HOLDOUT_EVERY = 5  # every 5th sampled position is held out to choose the ridge and accept the solve


def _sample_count(total: int, dim: int, per_dim: int, lo: int, hi: int) -> int:
    return int(min(total, max(lo, min(hi, per_dim * dim))))


def conv_patches(conv: nn.Conv2d, x: torch.Tensor, n: torch.Tensor, hw: torch.Tensor, out_w: int) -> torch.Tensor:
    """Input patches of ``conv`` at output positions (n, hw): S x groups x (Cin/groups * kh * kw).

    Zero padding is applied by masking the gathered values rather than by padding ``x``: the
    whole calibration batch would otherwise be copied once per layer.
    """
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    oh, ow = hw // out_w, hw % out_w
    pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    if conv.padding_mode == "zeros" or not any(pad):
        rows = (oh * sh - pad[2])[:, None] + torch.arange(kh, device=x.device) * dh  # S x kh
        cols = (ow * sw - pad[0])[:, None] + torch.arange(kw, device=x.device) * dw  # S x kw
        inside = ((rows >= 0) & (rows < x.shape[-2]))[:, :, None] & ((cols >= 0) & (cols < x.shape[-1]))[:, None, :]
        patches = x[n[:, None, None], :, rows.clamp(0, x.shape[-2] - 1)[:, :, None],
                    cols.clamp(0, x.shape[-1] - 1)[:, None, :]]  # S x kh x kw x Cin
        if not bool(inside.all()):
            patches.masked_fill_(~inside[..., None], 0)
        s, cin = patches.shape[0], patches.shape[-1]
        return patches.permute(0, 3, 1, 2).reshape(s, conv.groups, (cin // conv.groups) * kh * kw)
    x = F.pad(x, pad, mode=conv.padding_mode)
    cols = []
    for i in range(kh):
        for j in range(kw):
            cols.append(x[n, :, oh * sh + i * dh, ow * sw + j * dw])  # S x Cin
    patches = torch.stack(cols, dim=-1)  # S x Cin x (kh*kw), matching weight[o].reshape order
    s, cin, k = patches.shape
    return patches.reshape(s, conv.groups, (cin // conv.groups) * k)


def _ridge(g: torch.Tensor, alpha: float, dim: int | None = None) -> torch.Tensor:
    """Per-group ridge ``alpha * trace(G) / D`` (g x 1 x 1) for Gram matrices ``g`` (g x D x D).

    ``dim``: the number of unknowns D when ``g`` is the kernel matrix ``X X^T`` (same trace, S x S).
    """
    trace = torch.diagonal(g, dim1=1, dim2=2).sum(-1).clamp_min(1e-12)
    return (alpha * trace / (dim or g.shape[-1])).view(-1, 1, 1)


def _holdout(samples: int) -> torch.Tensor:
    """Mask of the positions held out to choose the ridge and accept the solve: every HOLDOUT_EVERY-th."""
    hold = torch.zeros(samples, dtype=torch.bool)
    hold[::HOLDOUT_EVERY] = True
    return hold


def _ridge_solver(g: torch.Tensor, alpha: float, w_old: torch.Tensor):
    """``b -> (G + lam I)^-1 (b + lam W_old)``, factored once (Cholesky) for repeated right-hand sides.

    ``G + lam I`` is symmetric positive definite in exact arithmetic; should rounding make the
    factorization fail, the solver falls back to a general solve.
    """
    lam = _ridge(g, alpha)
    lhs = g + lam * torch.eye(g.shape[-1], dtype=g.dtype)
    chol, failed = torch.linalg.cholesky_ex(lhs)
    if bool((failed != 0).any()):
        return lambda b: torch.linalg.solve(lhs, b + lam * w_old)
    return lambda b: torch.cholesky_solve(b + lam * w_old, chol)


def _solve(
    x: torch.Tensor, y: torch.Tensor, w_old: torch.Tensor, fast: bool = False, relu: tuple | None = None
) -> tuple[torch.Tensor | None, dict]:
    """Ridge solves for (g x S x D) inputs, (g x S x C) targets; None when the old weights are best.

    The ridge ``lam = alpha * trace(G) / D`` shrinks toward ``w_old``; ``alpha`` is chosen on
    held-out positions (one eigendecomposition serves all candidates). ``fast``: one fixed
    ``alpha``, no held-out check. ``relu``: see :func:`_relu_rounds`. Returns the new
    (g x D x C) weights (or None) and diagnostics.
    """
    if x.shape[1] < x.shape[-1]:
        return _solve_dual(x, y, w_old, fast, relu)
    w_old = w_old.double()
    dim = x.shape[-1]

    def gram(xs, ys):
        return (xs.transpose(1, 2) @ xs).double(), (xs.transpose(1, 2) @ ys).double()

    hold = _holdout(x.shape[1])
    if fast or int(hold.sum()) < 1 or int((~hold).sum()) < 2:
        g, b = gram(x, y)
        return _relu_rounds(x, y, _primal_fit(x, _ridge_solver(g, 1e-2, w_old), b), relu), {"alpha": 1e-2}
    g_t, b_t = gram(x[:, ~hold], y[:, ~hold])
    g_h, b_h = gram(x[:, hold], y[:, hold])
    energy = float((y[:, hold].double() ** 2).sum())

    def err(w):  # squared error on the held-out positions, from their Gram matrices
        return float((w * (g_h @ w)).sum() - 2 * (w * b_h).sum()) + energy

    base = err(w_old)
    best_alpha, best = None, base
    if dim > EIGH_MAX_DIM:
        # wide layers (e.g. 512 x 3 x 3 inputs): an eigendecomposition per layer is too slow on a
        # CPU; one Cholesky solve with a fixed, stronger ridge, still checked on held-out positions
        candidates = [(LARGE_ALPHA, _ridge_solver(g_t, LARGE_ALPHA, w_old)(b_t))]
    else:
        evals, evecs = torch.linalg.eigh(g_t)
        evals = evals.clamp_min(0).unsqueeze(-1)  # g x D x 1
        candidates = []
        for alpha in ALPHAS:
            lam = _ridge(g_t, alpha)
            candidates.append((alpha, evecs @ ((evecs.transpose(1, 2) @ (b_t + lam * w_old)) / (evals + lam))))
    for alpha, w in candidates:
        e = err(w)
        if e == e and e < best:
            best_alpha, best = alpha, e
    info = {"err_before": base / max(1, int(hold.sum())), "err_after": best / max(1, int(hold.sum())),
            "energy": energy / max(1, int(hold.sum()))}
    if best_alpha is None:
        return None, info
    info["alpha"] = best_alpha
    return _relu_rounds(x, y, _primal_fit(x, _ridge_solver(g_t + g_h, best_alpha, w_old), b_t + b_h), relu), info


def _primal_fit(x: torch.Tensor, solver, b: torch.Tensor):
    """``target -> W`` for the Gram-form solver; ``b`` is ``X^T y``, already computed for the first solve."""

    def fit(target: torch.Tensor | None) -> torch.Tensor:
        return solver(b if target is None else (x.transpose(1, 2) @ target).double())

    return fit


def _dual_fit(x: torch.Tensor, w_old: torch.Tensor, alpha: float, y: torch.Tensor):
    """``target -> W``: the ridge toward ``w_old`` in dual form, ``W_old + X^T (K + lam I)^-1 (T - X W_old)``,
    ``K = X X^T`` (g x S x S); ``lam`` is the primal's ``alpha * trace(G) / D`` (``trace(G) == trace(K)``)."""
    k = x @ x.transpose(1, 2)
    lam = _ridge(k, alpha, x.shape[-1])
    lhs = k + lam * torch.eye(k.shape[-1], dtype=k.dtype)
    chol, failed = torch.linalg.cholesky_ex(lhs)
    base = x @ w_old

    def fit(target: torch.Tensor | None) -> torch.Tensor:
        r = (y if target is None else target).double() - base
        a = torch.linalg.solve(lhs, r) if bool((failed != 0).any()) else torch.cholesky_solve(r, chol)
        return w_old + x.transpose(1, 2) @ a

    return fit


def _solve_dual(x, y, w_old, fast, relu) -> tuple[torch.Tensor | None, dict]:
    """:func:`_solve` for fewer sampled positions than unknowns (S < D): the same ridge and held-out choice
    of ``alpha``, through the S x S kernel matrix instead of the D x D Gram matrix."""
    x, y, w_old = x.double(), y.double(), w_old.double()
    hold = _holdout(x.shape[1])
    if fast or int(hold.sum()) < 1 or int((~hold).sum()) < 2:
        return _relu_rounds(x, y, _dual_fit(x, w_old, 1e-2, y), relu), {"alpha": 1e-2, "dual": True}
    x_t, y_t, x_h, y_h = x[:, ~hold], y[:, ~hold], x[:, hold], y[:, hold]
    energy = float((y_h**2).sum())

    def err(w):
        return float(((x_h @ w - y_h) ** 2).sum())

    base = err(w_old)
    k = x_t @ x_t.transpose(1, 2)
    evals, evecs = torch.linalg.eigh(k)  # one decomposition serves every alpha
    evals = evals.clamp_min(0).unsqueeze(-1)
    resid = evecs.transpose(1, 2) @ (y_t - x_t @ w_old)
    best_alpha, best = None, base
    for alpha in ALPHAS:
        w = w_old + x_t.transpose(1, 2) @ (evecs @ (resid / (evals + _ridge(k, alpha, x.shape[-1]))))
        e = err(w)
        if e == e and e < best:
            best_alpha, best = alpha, e
    holds = max(1, int(hold.sum()))
    info = {"err_before": base / holds, "err_after": best / holds, "energy": energy / holds, "dual": True}
    if best_alpha is None:
        return None, info
    info["alpha"] = best_alpha
    return _relu_rounds(x, y, _dual_fit(x, w_old, best_alpha, y), relu), info


# Two rounds: against five, the same accuracy within 0.1 point after the default recipe (ResNet-56,
# vgg_cifar at 50% and 40%; resnet18, mobilenet_v2 at 50%) and 2-3 s less on ResNet-56.
RELU_ROUNDS = 2


def _relu_rounds(x, y, fit, relu):
    """The ridge solution ``fit(None)`` (for the target ``y``), refined ReLU-aware when ``relu`` is given:
    ``fit(target)`` re-solves with the same factorization and ridge.

    ``relu``: ``(theta, sign, free)`` shaped like ``y`` (g x S x C) and (g x 1 x C): at ``free``
    positions the original's ReLU is off, and any prediction with ``sign * (pred - theta) <= 0``
    is as good as the target. Alternates between projecting the predictions there and re-solving.
    """
    w = fit(None)
    if relu is None or not bool(relu[2].any()):
        return w
    theta, sign, free = relu
    for _ in range(RELU_ROUNDS):
        pred = x @ w.to(x.dtype)
        over = sign * (pred - theta) > 0  # on the wrong side of the ReLU's threshold
        target = torch.where(free, torch.where(over, theta.to(pred), pred), y.to(pred))
        w = fit(target)
    return w


def bn_affine(bn: nn.Module, idx: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with bn(x) == a * x + c per channel (eval mode), restricted to ``idx`` when given."""
    n = bn.num_features
    mean = bn.running_mean.detach().double() if bn.running_mean is not None else torch.zeros(n, dtype=torch.float64)
    var = bn.running_var.detach().double() if bn.running_var is not None else torch.ones(n, dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    a = gamma / torch.sqrt(var + bn.eps)
    c = beta - a * mean
    if idx is not None:
        t = torch.as_tensor(idx, dtype=torch.long)
        a, c = a[t], c[t]
    return a.cpu(), c.cpu()


def sample_positions(out: torch.Tensor, layer: nn.Module, gen: torch.Generator, per_dim: int, lo: int, hi: int):
    """Sampled output positions (n, hw, out_w) of a layer output, and the output as N x C x positions."""
    if out.dim() == 2:
        out3 = out.unsqueeze(-1)
    elif isinstance(layer, nn.Linear):
        out3 = out.reshape(out.shape[0], -1, out.shape[-1]).transpose(1, 2)
    else:
        out3 = out.flatten(2)
    nb, _, spatial = out3.shape
    groups = getattr(layer, "groups", 1)
    count = _sample_count(nb * spatial, _dim_of(layer) * groups, per_dim, lo, hi)
    flat = torch.randperm(nb * spatial, generator=gen)[:count].sort().values.to(out.device)
    out_w = out.shape[-1] if (out.dim() == 4 and not isinstance(layer, nn.Linear)) else 1
    return flat // spatial, flat % spatial, out_w


def values_at(t: torch.Tensor, layer: nn.Module, n: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Values of an output-shaped tensor at sampled positions: S x C."""
    if t.dim() == 2:
        return t[n]
    if isinstance(layer, nn.Linear):
        return t.reshape(t.shape[0], -1, t.shape[-1])[n, hw]
    return t.flatten(2)[n, :, hw]


def _dim_of(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features + 1
    return layer.weight.shape[1] * layer.weight[0, 0].numel() + 1


def fit_layer(module: nn.Module, x: torch.Tensor, n, hw, out_w, target: torch.Tensor, fit_bias: bool,
         fast: bool = False, relu: tuple | None = None) -> dict:
    """Solve for ``module``'s weights from its input ``x`` (full batch) and S x Cout ``target``.

    ``relu``: ``(theta, sign, free)`` (S x C, C, S x C) when the output reaches a ReLU; see
    :func:`_relu_rounds`.
    """
    if isinstance(module, nn.Linear):
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x.unsqueeze(1)
        feats = x3[n, hw].unsqueeze(1)  # S x 1 x Cin
        groups = 1
        w = module.weight.detach().t().unsqueeze(0)  # 1 x Cin x Cout
    else:
        feats = conv_patches(module, x, n, hw, out_w)  # S x g x D
        groups = module.groups
        cout = module.weight.shape[0]
        w = module.weight.detach().reshape(groups, cout // groups, -1).transpose(1, 2)  # g x D x Cout/g
    feats = feats.transpose(0, 1).float()  # g x S x D
    y = target.float().reshape(target.shape[0], groups, -1).transpose(0, 1)  # g x S x C/g
    if fit_bias:
        ones = torch.ones(*feats.shape[:2], 1, dtype=feats.dtype, device=feats.device)
        feats = torch.cat([feats, ones], dim=-1)
        b = module.bias.detach() if module.bias is not None else torch.zeros(module.weight.shape[0])
        w = torch.cat([w, b.to(w).reshape(groups, 1, -1)], dim=1)
    if relu is not None:  # S x C -> g x S x C/g like ``y``; sign: C -> g x 1 x C/g
        theta, sign, free = relu
        relu = (theta.float().reshape(theta.shape[0], groups, -1).transpose(0, 1),
                sign.float().reshape(groups, 1, -1), free.reshape(free.shape[0], groups, -1).transpose(0, 1))
    new, info = _solve(feats.cpu(), y.cpu(), w.cpu(), fast, relu)
    info["status"] = "kept" if new is None else "refit"
    if new is None:
        return info
    new = new.to(module.weight.dtype).to(module.weight.device)
    if fit_bias:
        set_bias(module, new[:, -1, :].reshape(-1))
        new = new[:, :-1, :]
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight.copy_(new[0].t())
        else:
            module.weight.copy_(new.transpose(1, 2).reshape(module.weight.shape))
    return info
