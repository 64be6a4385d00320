import pytest
import torch

from compressor.budget import parse_budget, plan_from_counts, search_widths
from compressor.errors import BudgetError, UsageError
from compressor.groups import ChannelGroup


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [("50%flops", "flops", 0.5), ("40%FLOPS", "flops", 0.4), ("12.5%macs", "flops", 0.125),
     ("3ms", "latency_ms", 3.0), ("2x", "speedup", 2.0), ("1.5x", "speedup", 1.5)],
)
def test_parse_budget_accepts(text, kind, target):
    b = parse_budget(text)
    assert (b.kind, b.target) == (kind, pytest.approx(target))


@pytest.mark.parametrize("text", ["0%flops", "100%flops", "150%flops", "fast", "", "50%", "0ms", "1x", "-3ms"])
def test_parse_budget_rejects_with_example(text):
    with pytest.raises(UsageError, match="e.g."):
        parse_budget(text)


def _chain(sizes):
    """Groups of a conv chain; MACs of layer i = size_i * size_{i+1} * 100."""
    groups = [ChannelGroup(id=i, root=f"conv{i}", size=s, min_channels=2) for i, s in enumerate(sizes)]

    def macs(counts):
        widths = [3] + [counts.get(g.id, g.size) for g in groups] + [10]
        return sum(a * b * 100 for a, b in zip(widths, widths[1:], strict=False))

    return groups, macs


@pytest.mark.parametrize("ratio", [0.5, 0.4, 0.25])
def test_search_meets_target_tightly(ratio):
    groups, macs = _chain([32, 64, 64, 128])
    torch.manual_seed(0)
    scores = {g.id: torch.rand(g.size) for g in groups}
    full = macs({})
    counts = search_widths(groups, scores, ratio * full, macs)
    achieved = macs(counts) / full
    assert achieved <= ratio
    assert achieved >= ratio - 0.01
    assert all(counts[g.id] >= g.min_channels for g in groups)


def test_search_honours_multiple_and_uniform_ratios():
    groups, macs = _chain([32, 64, 64])
    for g in groups:
        g.multiple = 8
    scores = {g.id: torch.rand(g.size) for g in groups}
    counts = search_widths(groups, scores, 0.5 * macs({}), macs, proposed_ratios={g.id: 1.0 for g in groups})
    assert all(c % 8 == 0 for c in counts.values())
    assert macs(counts) <= 0.5 * macs({})


def test_a_single_channel_is_kept_below_the_alignment_only_where_allowed():
    from compressor.budget import _round_count, min_counts

    aligned = ChannelGroup(id=0, root="c", size=32, multiple=8, single_allowed=True)
    grouped = ChannelGroup(id=1, root="g", size=32, multiple=8)
    assert [_round_count(aligned, n) for n in (0, 1, 2, 8, 9, 40)] == [1, 1, 8, 8, 16, 32]
    assert [_round_count(grouped, n) for n in (0, 1, 2)] == [8, 8, 8]
    assert min_counts([aligned, grouped]) == {0: 1, 1: 8}


def test_unreachable_budget_raises():
    groups, macs = _chain([8, 8])
    for g in groups:
        g.min_channels = 8
    with pytest.raises(BudgetError, match="unreachable"):
        search_widths(groups, {g.id: torch.ones(8) for g in groups}, 0.5 * macs({}), macs)


def test_plan_keeps_highest_scores():
    g = ChannelGroup(id=0, root="c", size=5)
    plan = plan_from_counts([g], {0: torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2])}, {0: 2})
    assert plan[0].tolist() == [1, 3]
