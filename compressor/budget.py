"""Budgets (``50%flops``, ``3ms``, ``2x``) and the width search that meets a FLOPs budget."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compressor.errors import BudgetError, UsageError
from compressor.groups import ChannelGroup, Plan, Scores

BUDGET_HELP = (
    "N%flops keeps at most N% of the original FLOPs (FLOPs = 2 x multiply-accumulates; the ratio is the "
    "same for MACs), e.g. 50%flops. On a local device also Nms (pruned latency at most N milliseconds) "
    "or Nx (at least N times faster than the original)."
)


@dataclass(frozen=True)
class Budget:
    """A parsed budget.

    Attributes:
        kind: "flops", "latency_ms" or "speedup".
        target: FLOPs ratio kept (0..1), milliseconds, or the speed-up factor.
        text: The user's spelling, for messages and the report.
    """

    kind: str
    target: float
    text: str


def parse_budget(text: str) -> Budget:
    """Parse a ``--budget`` value; raise UsageError with an example on anything else."""
    spelled = text.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%(flops|macs)", spelled)
    if match:
        ratio = float(match.group(1)) / 100.0
        if not 0.0 < ratio < 1.0:
            raise UsageError(f"--budget {text!r} must keep between 0% and 100% of the FLOPs (exclusive); e.g. 50%flops")
        return Budget("flops", ratio, text)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)ms", spelled)
    if match:
        ms = float(match.group(1))
        if ms <= 0:
            raise UsageError(f"--budget {text!r} must be a positive latency; e.g. 3ms")
        return Budget("latency_ms", ms, text)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x", spelled)
    if match:
        factor = float(match.group(1))
        if factor <= 1.0:
            raise UsageError(f"--budget {text!r} must ask for a speed-up above 1; e.g. 2x")
        return Budget("speedup", factor, text)
    raise UsageError(
        f"--budget {text!r} is not understood; write N%flops (e.g. 50%flops), Nms (e.g. 3ms) or Nx (e.g. 2x)"
    )


def _round_count(group: ChannelGroup, count: int) -> int:
    """Clamp ``count`` to [min_channels, size] and round up to the group's multiple (a single channel
    stays single where the group allows it)."""
    m = max(1, group.multiple)
    floor = max(group.min_channels, 1)
    count = max(count, floor)
    if count == 1 and group.single_allowed:
        return 1
    count = -(-count // m) * m
    if count > group.size:
        count = group.size
    return count


def min_counts(groups: list[ChannelGroup]) -> dict[int, int]:
    """The smallest kept count of every prunable group."""
    return {g.id: _round_count(g, 0) for g in groups if g.prunable}


def check_reachable(floor_macs: float, target_macs: float) -> None:
    """Raise when even the narrowest allowed widths (``floor_macs``) exceed ``target_macs``.

    Raises:
        BudgetError: with the ways out (budget, alignment, --min-channels, --ignore).
    """
    if floor_macs > target_macs:
        raise BudgetError(
            f"budget unreachable: even the narrowest allowed widths keep {floor_macs:.3g} MACs "
            f"> target {target_macs:.3g}; relax the budget, pass --no-align, lower --min-channels "
            "or drop --ignore patterns"
        )


def normalized_scores(groups: list[ChannelGroup], scores: Scores) -> dict[int, torch.Tensor]:
    """Scores divided by their group's mean, so that one global threshold compares layers."""
    out = {}
    for g in groups:
        if g.prunable:
            s = scores[g.id].double().clamp_min(0)
            out[g.id] = s / s.mean().clamp_min(1e-30)
    return out


def search_widths(
    groups: list[ChannelGroup],
    scores: Scores,
    target_macs: float,
    estimate_macs: Callable[[dict[int, int]], float],
    *,
    proposed_ratios: dict[int, float] | None = None,
) -> dict[int, int]:
    """Kept channel count per prunable group so that ``estimate_macs(counts) <= target_macs``.

    Channels are ranked globally by their group-normalized score (or, with
    ``proposed_ratios``, every group's proposed keep ratio is scaled by one factor). A bisection
    finds the loosest setting under the target; then channels are added back greedily, best
    score per MAC first, while the target still holds, so the result sits just below it.

    Raises:
        BudgetError: the target is below what the smallest allowed widths give.
    """
    prunable = [g for g in groups if g.prunable]
    floor = min_counts(groups)
    check_reachable(estimate_macs(floor), target_macs)
    norm = normalized_scores(groups, scores)
    sorted_desc = {gid: torch.sort(s, descending=True).values for gid, s in norm.items()}

    def counts_at(level: float) -> dict[int, int]:
        counts = {}
        for g in prunable:
            if proposed_ratios is not None:
                want = int(round(g.size * min(1.0, proposed_ratios.get(g.id, 1.0) * level)))
            else:
                want = int((sorted_desc[g.id] >= level).sum())
            counts[g.id] = _round_count(g, want)
        return counts

    if proposed_ratios is not None:
        lo, hi = 0.0, 1.0 / max(1e-6, min(proposed_ratios.values() or [1.0]))  # lo fits, hi keeps all
    else:
        top = max(float(s[0]) for s in sorted_desc.values()) if sorted_desc else 1.0
        lo, hi = top * 2 + 1.0, 0.0  # lo: highest threshold (fits), hi: keeps everything
    if estimate_macs(counts_at(hi)) <= target_macs:
        return counts_at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if estimate_macs(counts_at(mid)) <= target_macs:
            lo = mid
        else:
            hi = mid
    counts = counts_at(lo)
    return _fill_greedily(prunable, sorted_desc, counts, target_macs, estimate_macs)


def _fill_greedily(prunable, sorted_desc, counts, target_macs, estimate_macs) -> dict[int, int]:
    """Add channels back, best next-channel score first, while the MAC target holds."""
    counts = dict(counts)
    blocked: set[int] = set()
    for _ in range(10_000):
        best, best_gain = None, -1.0
        for g in prunable:
            if g.id in blocked or counts[g.id] >= g.size:
                continue
            gain = float(sorted_desc[g.id][counts[g.id]])
            if gain > best_gain:
                best, best_gain = g, gain
        if best is None:
            break
        trial = dict(counts)
        trial[best.id] = _round_count(best, counts[best.id] + max(1, best.multiple))
        if estimate_macs(trial) <= target_macs:
            counts = trial
        else:
            blocked.add(best.id)
    return counts


def plan_from_counts(
    groups: list[ChannelGroup],
    scores: Scores,
    counts: dict[int, int],
    partitions: dict[int, torch.Tensor] | None = None,
) -> Plan:
    """Keep the ``counts[g]`` highest-scoring channels of each group (sorted indices).

    ``partitions[g]`` (for groups tied to grouped convolutions) gives each channel's
    convolution group; then every convolution group keeps the same number of channels, its
    own highest-scoring ones, so the pruned convolution stays valid.
    """
    plan: Plan = {}
    for g in groups:
        if not g.prunable or g.id not in counts or counts[g.id] >= g.size:
            continue
        score = scores[g.id].double()
        part = (partitions or {}).get(g.id)
        if part is None:
            order = torch.argsort(score, descending=True, stable=True)
            plan[g.id] = torch.sort(order[: counts[g.id]]).values
            continue
        n_parts = int(part.max()) + 1
        quota = -(-counts[g.id] // n_parts)
        kept = []
        for b in range(n_parts):
            members = torch.nonzero(part == b).flatten()
            order = torch.argsort(score[members], descending=True, stable=True)
            kept.append(members[order[:quota]])
        plan[g.id] = torch.sort(torch.cat(kept)).values
    return plan
