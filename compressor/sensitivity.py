"""Recoverability-aware width allocation: spend the MAC budget where pruning hurts least *after recovery*.

For every prunable group and a few keep ratios, the group alone is pruned (the channels kept
are the highest-scoring ones, as the final plan will keep), its direct consumers are refit by
least squares (the cheap part of the recovery recipe), and the distortion of the logits
against the original (KL divergence of the softmax; relative MSE for non-2-D outputs) is
measured on a small probe slice of the calibration images. Probes re-run only the part of
the network downstream of the pruned group, from cached original activations.

Widths are then chosen greedily: starting from full width, repeatedly remove one step of
channels from the group with the lowest increase of (interpolated) distortion per MAC saved,
until the fast MAC estimate meets the target. Distortions of different groups are assumed
additive. Summing their square roots instead (errors that add up coherently) or their squares
(favouring even cuts) was not better (sixteenth session, ResNet-56, 1,024 images, ``lsq`` then
``block``, unaligned widths, 5,000 val images, 50% / 40% FLOPs): additive 86.06% / 85.22%, square
roots 85.62% / 83.76% (most stage-1 and stage-2 blocks cut to one channel, stage 3 kept whole),
squares 86.10% / 84.52%.

Nor was the logits' squared error relative to their variance (what ``output="features"`` measures) better
than the KL divergence for a classifier (twentieth session, 1,024 images, ``lsq`` then ``block``, 50% / 40%
FLOPs). ResNet-56, whole runs (``model_output="features"``, evaluated in PyTorch on the 5,000 val images),
seeds 0 / 1 / 2: 86.22 / 86.10 / 86.02% and 84.28 / 83.90 / 84.46% against 85.66 / 85.60 / 85.98% and
84.76 / 84.44 / 83.66% (+0.37 / -0.07 on average). ``bench/recovery.py --criterion reconstruction`` with the
distortion patched: ResNet-20 (2,000 val) 79.50 / 74.35% against 79.45 / 76.20%, ``vgg_cifar`` 77.50 / 76.76%
against 77.68 / 76.90%, ``cifar_mobilenet_v2_half`` 76.36 / 75.48% against 76.12 / 74.90%. Over the four
networks +0.12 points at 50% and -0.37 at 40%.

On a CPU with native bfloat16 (``recovery.common.bf16_supported``) the probes run their ungrouped 3x3
convolutions in bfloat16, the original's cached activations included (seventeenth session). The logits of
ResNet-56 with every layer in bfloat16 differ from float32's by a KL divergence of 2e-5, against 1e-3 and
more for the probes that decide. Its allocation took 5.6-7.4 s against 8.0-9.1 s (50% / 40% FLOPs,
alternated in one process). With three calibration seeds at 50% / 40% FLOPs, it chose the same widths in
two of the six cases. In the other four, two groups' widths changed, and accuracy after ``lsq`` and
``block`` moved -0.08 / -0.44 points (seed 0) and -0.02 / +0.28 (seed 2): -0.04 on average. ResNet-20,
``vgg_cifar`` and the CIFAR MobileNetV2 got the same widths at both budgets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor import budget as budget_mod
from compressor import graph as graph_mod
from compressor.errors import BudgetError
from compressor.graph.core import run_hooked
from compressor.recovery.common import LAYER_TYPES, bf16_supported, spread
from compressor.recovery.lsq import run_node
from compressor.recovery.lsq_solve import conv_patches, sample_positions, values_at

# Probe slice: the logits' distortion on 64 images rather than 16 chose widths that did better after
# recovery, mostly at 40% FLOPs (ResNet-56 +1.7, resnet18 +1.1, vgg_cifar +0.6, mobilenet_v2 -0.5
# points with 1,024 images), for 4-8 s more allocation on ResNet-56 on a 2-core CPU. Fewer when the
# calibration set is small, so that at least FIT_IMAGES stay for the refits (64 images: 16 probe, 48 fit).
# More did not help (fourteenth session, ResNet-56, 1,024 images, default recipe, 5,000 val images,
# 50% / 40% FLOPs, against 86.16 / 85.16%): 160 probe images 86.22 / 84.82% with 6-8 s more allocation;
# 256 fit images with 8,192 sampled positions per refit 86.06 / 84.78%, 2-4 s more.
PROBE_IMAGES = 64
MIN_PROBE_IMAGES = 16
# Probe widths, as fractions of each group's width. Between probes the distortion is interpolated
# linearly, so the greedy's widths land on probes: with (0.6, 0.3) a layer that pruning hurts could
# only stay whole or lose 40%. Adding 0.8 did better after the default recovery with 1,024 images
# (bench/results/recovery.md, "probe widths"): ResNet-56 +0.3 / +1.1 points at 50% / 40% FLOPs,
# vgg_cifar +2.5 / -0.2, ResNet-20 +0.8 / 0.0, resnet18 -0.3 / +0.4, mobilenet_v2 -0.3 / +0.6, with
# ResNet-56's allocation no slower. A finer grid was not better: (0.8, 0.6, 0.4, 0.2) lost 2.7 / 3.2
# points on ResNet-20, and six probes from 0.9 to 0.15 gave back ResNet-56's gain for twice the time.
PROBE_RATIOS = (0.8, 0.6, 0.3)
PROBE_SAMPLES = 2048  # sampled output positions per least-squares fit in a probe
MAX_REFIT_CONSUMERS = 4  # groups feeding more layers (residual streams) are probed without the refit
FIT_IMAGES = 64  # images (disjoint from the probe images) whose statistics the probe refits use
MAX_GRAM_DIM = 2048
MAX_REFINE_ROUNDS = 4  # re-measure widths the allocation chose below the narrowest probe
CACHE_BUDGET = 1.5e9  # bytes of the original's cached activations on the probe images (ResNet-56, 64 images: 0.5 GB)


def _distortion(ref: torch.Tensor, out: torch.Tensor, output: str = "logits") -> float:
    """KL divergence between the class distributions of 2-D class outputs, else (feature maps, or
    ``output="features"``: an embedding) the squared error relative to the reference's variance."""
    if ref.dim() == 2 and output != "features":
        return float(F.kl_div(F.log_softmax(out.float(), 1), F.log_softmax(ref.float(), 1), log_target=True,
                              reduction="batchmean"))
    return float(((out - ref) ** 2).mean() / ref.var().clamp_min(1e-12))


class _Prober:
    """Runs pruned variants of ``graph.model`` on a probe batch, reusing the original's activations."""

    def __init__(self, graph: graph_mod.ChannelGraph, probe: torch.Tensor, device: str,
                 fit: torch.Tensor | None = None, output: str = "logits") -> None:
        self.graph = graph
        self.output = output
        self.probe = probe.to(device)
        # the probes' 3x3 convolutions in bfloat16 where the CPU has it natively (module docstring)
        self.bf16 = self.probe.dtype == torch.float32 and bf16_supported(device)
        if self.probe.dim() == 4:  # channels-last activations: the probes' convolutions run faster on a CPU
            self.probe = self.probe.contiguous(memory_format=torch.channels_last)
        self.grams = _consumer_grams(graph, fit, device) if fit is not None and len(fit) else {}
        self.gm: fx.GraphModule | None
        try:
            self.gm = fx.symbolic_trace(graph.model)
        except Exception:  # noqa: BLE001 - untraceable: probes run the whole pruned model
            self.gm = None
        with torch.no_grad():
            if self.gm is not None:
                nodes = list(self.gm.graph.nodes)
                # a probe drops each activation after its last reader: the allocator then reuses warm memory
                # (keeping them all made the element-wise ops several times slower than in a plain forward)
                self.last_reader = {a: i for i, node in enumerate(nodes) for a in node.all_input_nodes}
                # every activation of the original is cached: fewer probe images when they would not fit
                keep = max(1, min(len(self.probe), int(CACHE_BUDGET // self._bytes_per_image())))
                if keep < len(self.probe):
                    self.probe = self.probe[torch.linspace(0, len(self.probe) - 1, keep).round().long().unique()]
                self.cache = self._walk(self.probe)
                self.ref = fx.node.map_arg(nodes[-1].args[0], lambda a: self.cache[a])
            else:
                self.ref = graph.model(self.probe)

    def _walk(self, images: torch.Tensor) -> dict[fx.Node, object]:
        assert self.gm is not None
        values: dict[fx.Node, object] = {}
        for node in self.gm.graph.nodes:
            values[node] = run_node(self.gm, node, values, images, self.bf16)
        return values

    def _bytes_per_image(self) -> int:
        values = self._walk(self.probe[:1])
        return max(1, sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor)))

    def distortion(self, plan: dict[int, torch.Tensor], refit: bool = True) -> float:
        pruned = graph_mod.apply_plan(self.graph, plan, share_untouched=True)
        model, kept = pruned.model, pruned.kept  # apply_plan returns it in eval mode
        with torch.no_grad():
            if self.gm is None:
                return _distortion(self.ref, model(self.probe), self.output)
            return _distortion(self.ref, self._run(model, kept, refit), self.output)

    def _run(self, model: nn.Module, kept: dict, refit: bool):
        gen = torch.Generator().manual_seed(0)
        changed = set(kept)
        env: dict[fx.Node, object] = {}
        dirty: set[fx.Node] = set()
        root = _Root(model, self.gm)
        for position, node in enumerate(self.gm.graph.nodes):
            if node.op == "get_attr":  # buffers (e.g. index maps) may have changed with the pruning
                value = run_node(root, node, env, self.probe, self.bf16)
                cached = self.cache[node]
                same = value is cached or (
                    isinstance(value, torch.Tensor) and isinstance(cached, torch.Tensor)
                    and value.shape == cached.shape and bool(torch.equal(value, cached))
                )
                env[node] = value
                if not same:
                    dirty.add(node)
                continue
            touches = node.op == "call_module" and _owner(str(node.target), changed)
            if not touches and not any(a in dirty for a in node.all_input_nodes):
                env[node] = self.cache[node]  # unaffected: the original's value
                continue
            dirty.add(node)
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a])
            if node.op == "call_module" and refit and len(self._consumers(kept)) <= MAX_REFIT_CONSUMERS:
                module = model.get_submodule(node.target)
                if isinstance(module, LAYER_TYPES) and "in" in kept.get(node.target, {}):
                    self._refit(module, node, env, kept, gen)
            if _in_place(node, model):
                first = node.args[0] if node.args else None
                if isinstance(first, fx.Node) and first not in dirty and isinstance(env.get(first), torch.Tensor):
                    env[first] = env[first].clone()  # never mutate a cached activation
            env[node] = run_node(root, node, env, self.probe, self.bf16)
            for a in node.all_input_nodes:
                if self.last_reader[a] == position:
                    env.pop(a, None)
        return None

    @staticmethod
    def _consumers(kept: dict) -> list[str]:
        return [n for n, rec in kept.items() if "in" in rec]

    def _refit(self, module, node, env, kept, gen) -> None:
        """Least squares on the *fit* images (never the probe images, which would flatter the refit):
        the consumer's Gram matrix of the original inputs, restricted to the kept input channels."""
        del env, gen
        rec = kept.get(node.target, {})
        if node.target not in self.grams or "out" in rec:
            return
        g, b, k2 = self.grams[node.target]
        cols = torch.as_tensor([c * k2 + j for c in rec["in"] for j in range(k2)] + [g.shape[0] - 1])
        gk, bk = g[cols][:, cols], b[cols]
        lam = 1e-2 * torch.diagonal(gk).sum() / len(cols)
        w = torch.linalg.solve(gk + lam * torch.eye(len(cols), dtype=gk.dtype), bk)  # D x Cout
        with torch.no_grad():
            module.weight.copy_(w[:-1].t().reshape(module.weight.shape).to(module.weight))
            bias = w[-1].to(module.weight)
            if module.bias is None:
                module.bias = nn.Parameter(bias)
            else:
                module.bias.copy_(bias)


def _consumer_grams(graph: graph_mod.ChannelGraph, fit: torch.Tensor, device: str) -> dict[str, tuple]:
    """For each non-grouped conv / linear that consumes a prunable group: (G, B, kernel area) of its original
    input patches (+ a ones column) and outputs on ``fit``, so a probe's refit is a restricted solve."""
    names = {m.module for g in graph.groups if g.prunable for m in g.consumers()}
    model = graph.model
    gen = torch.Generator().manual_seed(1)
    grams: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, out):
            x = inputs[0].detach()
            n, hw, out_w = sample_positions(out, module, gen, 1, PROBE_SAMPLES, PROBE_SAMPLES)
            if isinstance(module, nn.Linear):
                if x.dim() != 2:
                    return
                feats, k2 = x[n], 1
            else:
                feats = conv_patches(module, x, n, hw, out_w)[:, 0]
                k2 = module.weight[0, 0].numel()
            feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1).double()
            y = values_at(out.detach(), module, n, hw).double()
            grams[name] = ((feats.T @ feats).cpu(), (feats.T @ y).cpu(), k2)

        return fn

    for name in names:
        module = model.get_submodule(name) if name else None
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            d = module.weight[0].numel() + 1
            if d <= MAX_GRAM_DIM:
                handles.append(module.register_forward_hook(hook(name)))
    run_hooked(model, fit.to(device), handles)
    return grams


class _Root:
    """Module lookup for ``run_node``: modules and attributes of the pruned model, constants of the trace."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm

    def get_submodule(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def __getattr__(self, name: str):
        model = self.__dict__["model"]
        return getattr(model, name) if hasattr(model, name) else getattr(self.__dict__["gm"], name)


def _in_place(node: fx.Node, model: nn.Module) -> bool:
    import operator

    if node.op == "call_function":
        return node.target in (operator.iadd, operator.imul, operator.isub) or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    return False


def _owner(target: str, changed: set[str]) -> bool:
    """Whether ``target`` (a module or parameter path) is, or lies inside, a changed module."""
    parts = target.split(".")
    return any(".".join(parts[:i]) in changed for i in range(1, len(parts) + 1))


def _interp(points: list[tuple[int, float]], count: int) -> float:
    """Piecewise-linear distortion at ``count`` through (count, distortion) points sorted by count desc;
    linear extrapolation below the smallest probed count."""
    for (c_hi, d_hi), (c_lo, d_lo) in zip(points, points[1:], strict=False):
        if c_lo <= count <= c_hi:
            if c_hi == c_lo:
                return d_lo
            return d_lo + (d_hi - d_lo) * (count - c_lo) / (c_hi - c_lo)
    # below the narrowest probe: extrapolate with the steeper of the last segment's slope and the
    # average slope from full width (unmeasured territory is never assumed to be free)
    (c_hi, d_hi), (c_lo, d_lo) = points[-2], points[-1]
    c_full = points[0][0]
    slope = max((d_lo - d_hi) / max(1, c_hi - c_lo), d_lo / max(1, c_full - c_lo))
    return d_lo + slope * (c_lo - count)


def _make_prober(graph: graph_mod.ChannelGraph, calib: torch.Tensor, device: str, probe_images: int = PROBE_IMAGES,
                 refit: bool = True, output: str = "logits") -> _Prober:
    """A prober on a strided slice of ``calib``; its refits use other images (disjoint from the probe)."""
    n = len(calib)
    probe_images = min(probe_images, max(MIN_PROBE_IMAGES, n - FIT_IMAGES))
    idx = torch.linspace(0, n - 1, min(n, probe_images)).round().long().unique()  # strided: data may be sorted
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    others = torch.nonzero(rest).flatten()
    fit = calib[spread(others, FIT_IMAGES)] if len(others) else None
    return _Prober(graph, calib[idx], device, fit if refit else None, output)


def probe_sensitivity(
    graph: graph_mod.ChannelGraph,
    scores: dict[int, torch.Tensor],
    calib: torch.Tensor,
    *,
    device: str = "cpu",
    ratios: tuple[float, ...] = PROBE_RATIOS,
    probe_images: int = PROBE_IMAGES,
    refit: bool = True,
    progress: Callable[[str], None] | None = None,
    prober: _Prober | None = None,
) -> dict[int, list[tuple[int, float]]]:
    """Measured (kept count, distortion) points per prunable group, counts descending, starting at full width."""
    if prober is None:
        prober = _make_prober(graph, calib, device, probe_images, refit)
    curves: dict[int, list[tuple[int, float]]] = {}
    prunable = [g for g in graph.groups if g.prunable]
    for i, g in enumerate(prunable):
        points = [(g.size, 0.0)]
        for r in ratios:
            count = budget_mod._round_count(g, int(round(g.size * r)))
            if count >= points[-1][0]:
                continue
            plan = {g.id: _top(scores[g.id], count)}
            points.append((count, max(points[-1][1], prober.distortion(plan, refit))))
        if len(points) == 1:
            points.append((g.size - 1, 0.0))
        curves[g.id] = points
        if progress is not None:
            progress(f"sensitivity {i + 1}/{len(prunable)}: {g.root} {points[1:]}")
    return curves


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` highest-scoring channels (the ones the final plan keeps)."""
    return torch.sort(torch.argsort(score.double(), descending=True, stable=True)[:count]).values


def _greedy(by_id, curves, floor, estimate, change, target_macs) -> tuple[dict[int, int], float]:
    """From full width, repeatedly take one step of channels from the group whose (interpolated)
    distortion rises least per MAC saved, until the estimate meets ``target_macs``.

    ``change(counts, gid, new)``: the estimate's change when group ``gid`` goes to ``new`` channels.
    """
    counts = {gid: g.size for gid, g in by_id.items()}
    current = estimate(counts)
    while current > target_macs:
        best_cost, best_step = math.inf, None
        for gid, count in counts.items():
            g = by_id[gid]
            new = budget_mod._round_count(g, count - max(1, g.multiple))
            if new >= count or new < floor[gid]:
                continue
            saved = -change(counts, gid, new)
            if saved <= 0:
                continue
            cost = (_interp(curves[gid], new) - _interp(curves[gid], count)) / saved
            if cost < best_cost:
                best_cost, best_step = cost, (gid, new, saved)
        if best_step is None:  # cannot shrink further (should not happen after the floor check)
            raise BudgetError(f"budget unreachable: {current:.3g} MACs > target {target_macs:.3g}")
        gid, new, saved = best_step
        counts = {**counts, gid: new}
        current -= saved
    return counts, current


def allocate_widths(
    graph: graph_mod.ChannelGraph,
    scores: dict[int, torch.Tensor],
    calib: torch.Tensor,
    target_macs: float,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
    ratios: tuple[float, ...] = PROBE_RATIOS,
    output: str = "logits",
    cache: dict | None = None,
) -> dict[int, int]:
    """Kept channel count per prunable group with ``estimate_macs <= target_macs``, by measured sensitivity.

    Counts honour each group's ``min_channels`` and ``multiple``. ``ratios``: the probe widths, as
    fractions of each group's width (PROBE_RATIOS). ``output``: ``"features"`` for a model whose output is
    an embedding (the distortion is then its relative squared error, not a KL divergence). ``cache``: a
    dict kept between calls on the same graph, scores and images (the latency search's trials): the
    prober and its measured curves are made once and reused, since they do not depend on the target.

    Raises:
        BudgetError: the target is below what the narrowest allowed widths give.
    """
    del batch_size  # the probe slice is one batch
    groups = graph.groups
    prunable = [g for g in groups if g.prunable]
    floor = budget_mod.min_counts(groups)
    estimate = lambda counts: graph_mod.estimate_macs(graph, counts)  # noqa: E731
    change = lambda counts, gid, new: graph_mod.estimate_macs_change(graph, counts, gid, new)  # noqa: E731
    budget_mod.check_reachable(estimate(floor), target_macs)
    counts = {g.id: g.size for g in prunable}
    if estimate(counts) <= target_macs:
        return counts
    start = time.perf_counter()
    cache = {} if cache is None else cache
    if "curves" not in cache:
        cache["prober"] = _make_prober(graph, calib, device, output=output)
        cache["curves"] = probe_sensitivity(graph, scores, calib, device=device, ratios=ratios, progress=progress,
                                            prober=cache["prober"])
    prober, curves = cache["prober"], cache["curves"]
    by_id = {g.id: g for g in prunable}
    for round_ in range(MAX_REFINE_ROUNDS + 1):
        counts, current = _greedy(by_id, curves, floor, estimate, change, target_macs)
        # a width below the narrowest probe rests on extrapolation: measure it and decide again
        unmeasured = [gid for gid, count in counts.items() if count < curves[gid][-1][0]]
        if not unmeasured or round_ == MAX_REFINE_ROUNDS:
            break
        for gid in unmeasured:
            plan = {gid: _top(scores[gid], counts[gid])}
            curves[gid].append((counts[gid], max(curves[gid][-1][1], prober.distortion(plan))))
            if progress is not None:
                progress(f"sensitivity refine: {by_id[gid].root} {curves[gid][-1]}")
    if progress is not None:
        progress(f"sensitivity allocation: {current:.4g} MACs in {time.perf_counter() - start:.1f} s")
    return counts
