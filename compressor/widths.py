"""Choosing per-group widths that meet the budget: FLOPs directly, latency by measurement."""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor import budget as budget_mod
from compressor import graph as graph_mod
from compressor.errors import BudgetError, CompressorError

MAX_VERIFY_ROUNDS = 5
LATENCY_STEPS = 7


def make_plan(graph: graph_mod.ChannelGraph, scores: dict[int, torch.Tensor], counts: dict[int, int]):
    """The plan keeping the best channels per group, balanced across grouped-convolution groups."""
    partitions = {}
    for g in graph.groups:
        part = graph_mod.conv_groups(graph, g.id) if g.prunable else None
        if part is not None:
            partitions[g.id] = part
    return budget_mod.plan_from_counts(graph.groups, scores, counts, partitions)


def flops_widths(
    allocation: str,
    graph: graph_mod.ChannelGraph,
    scores: dict[int, torch.Tensor],
    ratio: float,
    *,
    criterion=None,
    ctx=None,
    calib: torch.Tensor | None = None,
    verify: bool = True,
    cache: dict | None = None,
) -> dict[int, int]:
    """Kept counts whose exactly counted MACs are at most ``ratio`` of the original's.

    The fast estimate drives the search; the physically pruned candidate is then counted
    exactly and the target tightened until the exact count fits. ``cache``: kept by the caller between
    calls on the same graph and scores (see ``sensitivity.allocate_widths``).
    """
    full = {g.id: g.size for g in graph.groups if g.prunable}
    estimate: Callable[[dict[int, int]], float] = lambda counts: graph_mod.estimate_macs(graph, counts)  # noqa: E731
    est_full = estimate(full)
    exact_full, _ = graph_mod.count_macs_params(graph.model, graph.example_input)
    target_est = ratio * est_full
    counts = full
    for _ in range(MAX_VERIFY_ROUNDS):
        counts = _allocate(allocation, graph, scores, target_est, estimate, criterion, ctx, calib, cache)
        if not verify:
            return counts
        plan = make_plan(graph, scores, counts)
        exact, _ = graph_mod.count_macs_params(graph_mod.apply_plan(graph, plan).model, graph.example_input)
        if exact <= ratio * exact_full:
            return counts
        target_est *= (ratio * exact_full) / exact * 0.999
    raise BudgetError(
        f"could not meet {ratio:.0%} of the FLOPs exactly after {MAX_VERIFY_ROUNDS} refinements; "
        "relax the budget slightly"
    )


def _allocate(allocation, graph, scores, target_est, estimate, criterion, ctx, calib, cache=None) -> dict[int, int]:
    groups = graph.groups
    if allocation == "uniform":
        ratios = {g.id: 1.0 for g in groups if g.prunable}
        return budget_mod.search_widths(groups, scores, target_est, estimate, proposed_ratios=ratios)
    if allocation == "criterion":
        ratios = criterion.propose_keep_ratios(ctx) if criterion is not None else None
        if not ratios:
            raise CompressorError(
                f"criterion {getattr(criterion, 'name', '?')!r} proposes no widths; use --allocation global"
            )
        return budget_mod.search_widths(groups, scores, target_est, estimate, proposed_ratios=ratios)
    if allocation == "sensitivity":
        if calib is None:
            raise CompressorError("--allocation sensitivity needs calibration data; pass --calib or use global")
        from compressor.sensitivity import allocate_widths

        return allocate_widths(graph, scores, calib, target_est, output=getattr(ctx, "output", "logits"),
                               cache=cache)
    return budget_mod.search_widths(groups, scores, target_est, estimate)


def latency_widths(
    allocation: str,
    graph: graph_mod.ChannelGraph,
    scores: dict[int, torch.Tensor],
    target_ms: float,
    measure_ms: Callable[[torch.nn.Module], float],
    *,
    progress: Callable[[str], None] = lambda _msg: None,
    prepare: Callable[[graph_mod.PrunedModel], torch.nn.Module] | None = None,
    **kwargs,
) -> tuple[dict[int, int], list[dict]]:
    """Widest candidate whose *measured* latency is at most ``target_ms``.

    Bisects the FLOPs ratio; each candidate is pruned physically and timed with
    ``measure_ms`` on the target, so the final choice is a direct measurement. ``prepare``: turns
    the pruned candidate into the model that would ship (e.g. its thin branches removed), which
    is then timed and counted.
    """
    candidates: list[dict] = []
    cache: dict = {}  # the sensitivity probes, measured once for all the trials

    def trial(ratio: float) -> tuple[dict[int, int], float]:
        counts = flops_widths(allocation, graph, scores, ratio, verify=False, cache=cache, **kwargs)
        plan = make_plan(graph, scores, counts)
        candidate = graph_mod.apply_plan(graph, plan)
        pruned = prepare(candidate) if prepare is not None else candidate.model
        ms = measure_ms(pruned)
        macs, _ = graph_mod.count_macs_params(pruned, graph.example_input)
        candidates.append({"flops_ratio": ratio, "macs": macs, "latency_ms": ms})
        progress(f"candidate at {ratio:.0%} FLOPs: {ms:.3f} ms (target {target_ms:.3f} ms)")
        return counts, ms

    lo, hi = 0.02, 1.0
    best = None
    counts, ms = trial(0.05)
    if ms > target_ms:
        raise BudgetError(
            f"latency budget unreachable: even at 5% of the FLOPs the model takes {ms:.3f} ms > {target_ms:.3f} ms "
            "(the network is launch-bound here); relax the budget"
        )
    best, best_index, lo = counts, 0, 0.05
    for _ in range(LATENCY_STEPS):
        mid = (lo + hi) / 2
        counts, ms = trial(mid)
        if ms <= target_ms:
            best, best_index, lo = counts, len(candidates) - 1, mid
        else:
            hi = mid
    candidates[best_index]["chosen"] = True
    return best, candidates
