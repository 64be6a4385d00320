"""Channel-importance criteria on a tiny residual Conv-BN net with hand-built channel groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.criteria import ScoringContext, get_criterion, list_criteria
from compressor.errors import CompressorError
from compressor.groups import ChannelGroup, GroupMember

# ---------------------------------------------------------------- a tiny net and its groups


class TinyRes(nn.Module):
    """stem conv-bn-relu (8) -> block conv1-bn1-relu (4) -> conv2-bn2 (+ stem) -> relu -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_model(seed: int = 0) -> TinyRes:
    torch.manual_seed(seed)
    model = TinyRes()
    with torch.no_grad():  # non-trivial BN statistics so that folding and post-BN taps matter
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def tiny_groups(reverse: bool = False) -> list[ChannelGroup]:
    """The residual group (8), the block-internal group (4) and the unprunable classifier output.

    ``reverse`` numbers the residual group's channels backwards (group channel c = module index 7-c)
    to check that criteria honour member indices.
    """
    r8 = tuple(range(7, -1, -1)) if reverse else tuple(range(8))
    res = ChannelGroup(
        0, "conv0", 8,
        [GroupMember("conv0", "out", r8), GroupMember("bn0", "out", r8), GroupMember("conv2", "out", r8),
         GroupMember("bn2", "out", r8), GroupMember("conv1", "in", r8), GroupMember("fc", "in", r8)],
    )
    inner = ChannelGroup(
        1, "conv1", 4,
        [GroupMember("conv1", "out", tuple(range(4))), GroupMember("bn1", "out", tuple(range(4))),
         GroupMember("conv2", "in", tuple(range(4)))],
    )
    head = ChannelGroup(2, "fc", 10, [GroupMember("fc", "out", tuple(range(10)))], prunable=False, reason="output")
    return [res, inner, head]


def images(n: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(8, 8), mode="bilinear", align_corners=False)


def context(model=None, groups=None, calib="default", **kw) -> ScoringContext:
    model = tiny_model() if model is None else model
    calib = images() if isinstance(calib, str) else calib
    return ScoringContext(model=model, groups=groups or tiny_groups(), calib=calib, batch_size=8, **kw)


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for n, m in model.named_modules()},
        [p.grad is None for p in model.parameters()],
    )


ALL = list_criteria()
DATA = [n for n in ALL if get_criterion(n).needs_data]


# ---------------------------------------------------------------- contract tests, every criterion


def test_expected_members_registered():
    expected = {"l1", "l2", "fpgm", "bn_scale", "random", "taylor", "lrp", "attribution", "taylor_guided",
                "snpfi", "dirichlet", "reconstruction"}
    assert expected <= set(ALL), expected - set(ALL)
    for name in ALL:
        c = get_criterion(name)
        assert c.name == name and c.description and c.paper


@pytest.mark.parametrize("name", ALL)
def test_scores_shape_finite_deterministic_and_stateless(name):
    model = tiny_model()
    # a mixed-mode, partly frozen model with a user hook must come back exactly as it was
    model.bn1.train()
    model.conv0.weight.requires_grad_(False)
    handle = model.fc.register_forward_hook(lambda *a: None)
    before = snapshot(model)
    ctx = context(model)
    scores = get_criterion(name).score(ctx)
    again = get_criterion(name).score(context(model))
    after = snapshot(model)
    handle.remove()

    assert set(scores) == {0, 1}
    for g in ctx.prunable_groups():
        s = scores[g.id]
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == (g.size,)
        assert torch.isfinite(s).all() and (s >= 0).all()
        assert torch.equal(s, again[g.id]), "not deterministic for the same seed"
    for b, a in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(a, b)
    assert before[1:] == after[1:]


@pytest.mark.parametrize("name", DATA)
def test_data_criteria_need_calibration(name):
    with pytest.raises(CompressorError, match="needs calibration data"):
        get_criterion(name).score(context(calib=None))


SAMPLING = ("random", "dirichlet", "snpfi")  # they draw their random numbers in group order


@pytest.mark.parametrize("name", [n for n in ALL if n not in SAMPLING])
def test_member_indices_are_honoured(name):
    """Numbering the residual group backwards reverses its scores (same channels, other order)."""
    plain = get_criterion(name).score(context())
    rev = get_criterion(name).score(context(groups=tiny_groups(reverse=True)))
    torch.testing.assert_close(rev[0], plain[0].flip(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rev[1], plain[1], rtol=1e-4, atol=1e-6)


def test_random_depends_on_seed():
    a = get_criterion("random").score(context(seed=0))
    b = get_criterion("random").score(context(seed=1))
    assert not torch.equal(a[0], b[0])


# ---------------------------------------------------------------- sanity checks per criterion


@pytest.mark.parametrize("name", ["l1", "l2", "fpgm"])
def test_weight_norms_rank_a_zeroed_filter_lowest(name):
    model = tiny_model()
    with torch.no_grad():
        model.conv1.weight[2].zero_()
    s = get_criterion(name).score(context(model))[1]
    assert int(s.argmin()) == 2


def test_bn_scale_reads_gamma():
    model = tiny_model()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, -3.0, 0.01, 2.0]))
    s = get_criterion("bn_scale").score(context(model))[1]
    assert s.argsort().tolist() == [2, 0, 3, 1]


def dead_consumer_model(channel: int = 2) -> TinyRes:
    """Channel ``channel`` of the block-internal group feeds nothing (its conv2 input weights are 0)."""
    model = tiny_model()
    with torch.no_grad():
        model.conv2.weight[:, channel].zero_()
    return model


@pytest.mark.parametrize("name", ["taylor", "lrp"])
def test_gradient_criteria_give_no_importance_to_a_channel_nobody_reads(name):
    s = get_criterion(name).score(context(dead_consumer_model(2)))[1]
    assert s[2] <= 1e-6 * s.max() and s.max() > 0


def test_dirichlet_gives_the_lowest_weight_to_a_channel_nobody_reads():
    s = get_criterion("dirichlet").score(context(dead_consumer_model(2)))[1]
    assert int(s.argmin()) == 2


def test_taylor_guided_masks_a_channel_nobody_reads_first():
    s = get_criterion("taylor_guided").score(context(dead_consumer_model(2)))[1]
    assert int(s.argmin()) == 2
    assert s[2] < 0.25 + 1e-6  # masked in the first round that masks anything (level 1 of 4, no evidence)


@pytest.mark.parametrize("name", ["attribution", "snpfi", "taylor"])
def test_activation_criteria_give_nothing_to_a_silent_channel(name):
    model = tiny_model()
    with torch.no_grad():  # channel 1 of the inner group outputs exactly 0 after bn1
        model.conv1.weight[1].zero_()
        model.bn1.bias[1] = 0.0
        model.bn1.running_mean[1] = 0.0
    s = get_criterion(name).score(context(model))[1]
    assert s[1] <= 1e-6 * s.max() and s.max() > 0


def test_taylor_uses_labels_when_given():
    calib = images()
    labels = torch.arange(len(calib)) % 10
    free = get_criterion("taylor").score(context(calib=calib))
    labelled = get_criterion("taylor").score(context(calib=calib, labels=labels))
    assert not torch.allclose(free[0], labelled[0])


def test_lrp_matches_an_explicit_relevance_propagation():
    """The modified-gradient LRP equals LRP written out by hand on the tiny residual net.

    As in the authors' code: a relevance of 1 at each image's explained class, then per-channel
    sums of the absolute relevance over images and positions.
    """
    from compressor.criteria.lrp import lrp_relevance

    model, x = tiny_model(), images(6)
    eps = 1e-2
    got = lrp_relevance(context(model, calib=x), eps=eps)

    with torch.no_grad():
        x0 = F.relu(model.bn0(model.conv0(x)))
        y = F.relu(model.bn1(model.conv1(x0)))
        s = model.bn2(model.conv2(y))
        t = s + x0
        u = F.relu(t)
        p = u.mean((2, 3))
        logits = model.fc(p)
        r_logits = torch.zeros_like(logits)
        r_logits.scatter_(1, logits.argmax(1, keepdim=True), 1.0)
        z = logits + eps * torch.where(logits >= 0, 1.0, -1.0)
        r_p = p * ((r_logits / z) @ model.fc.weight)  # epsilon rule
        r_u = u / u.sum((2, 3), keepdim=True).clamp_min(1e-30) * r_p[:, :, None, None]  # average pool
        r_s = torch.where(t != 0, s / t, torch.zeros_like(t)) * r_u  # proportional split at the addition
        # alpha1-beta0 through conv2 with bn2 folded in
        bn = model.bn2
        wf = model.conv2.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None, None, None]
        cols = F.unfold(y, 3, padding=1)  # N x (4*9) x L
        contrib = (cols[:, None] * wf.flatten(1)[None, :, :, None]).clamp_min(0)  # N x 8 x 36 x L
        share = contrib / contrib.sum(2, keepdim=True).clamp_min(1e-9)
        r_cols = (share * r_s.flatten(2)[:, :, None, :]).sum(1)  # N x 36 x L
        r_y = F.fold(r_cols, y.shape[2:], 3, padding=1)

    assert (r_y < 0).any() and (r_s < 0).any()  # so the absolute value is tested, not a no-op
    torch.testing.assert_close(got[1]["bn1"].float(), r_y.abs().sum((0, 2, 3)), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(got[0]["bn2"].float(), r_s.abs().sum((0, 2, 3)), rtol=1e-3, atol=1e-5)


def test_lrp_normalizes_each_layer_by_its_sum():
    """Per-layer L1 normalization (the authors' code): a group read at one producer sums to 1, at two, to 2."""
    s = get_criterion("lrp").score(context())
    torch.testing.assert_close(float(s[1].sum()), 1.0, rtol=1e-5, atol=0)  # inner group: bn1
    torch.testing.assert_close(float(s[0].sum()), 2.0, rtol=1e-5, atol=0)  # residual group: bn0 and bn2


def _enumerated_shapley(model: nn.Module, group: ChannelGroup, x: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values of the group's channels in SNPFI's game: worth = mean log P(own prediction)."""
    import itertools
    from math import factorial

    from compressor.criteria._common import Taps

    with torch.no_grad():
        target = model(x).argmax(1)
    worth = {}
    with Taps(model, [group]) as taps, torch.no_grad():
        for bits in itertools.product((0, 1), repeat=group.size):
            taps.masks[group.id] = torch.tensor(bits, dtype=torch.float32)
            worth[bits] = float(F.log_softmax(model(x), 1).gather(1, target[:, None]).mean())
            taps.clear()
    n = group.size
    phi = torch.zeros(n, dtype=torch.float64)
    for bits, v in worth.items():
        for i in range(n):
            if not bits[i]:
                k = sum(bits)
                joined = tuple(1 if j == i else b for j, b in enumerate(bits))
                phi[i] += factorial(k) * factorial(n - k - 1) / factorial(n) * (worth[joined] - v)
    return phi


def test_snpfi_estimates_the_shapley_values_of_its_layer_game():
    model, groups, x = tiny_model(), tiny_groups(), images(32)
    crit = get_criterion("snpfi")
    game = crit._game(context(model, calib=x))
    for g in groups[:2]:
        exact = _enumerated_shapley(model, g, x)
        estimate = game[g.id][0]
        corr = torch.corrcoef(torch.stack([exact, estimate]))[0, 1]
        assert corr > 0.95, (g.root, exact, estimate)
        assert (estimate - exact).abs().max() < 0.3 * exact.abs().max(), (g.root, exact, estimate)
    s = crit.score(context(model, calib=x))[1]
    assert int(s.argmax()) == int(_enumerated_shapley(model, groups[1], x).argmax())


def test_snpfi_utilization_strength_is_the_order_of_the_interactions():
    """On games with known Harsanyi dividends: |T|/(|T|+1) for one interaction of order |T|."""
    from compressor.criteria.snpfi import utilization_strength

    q = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    n = 6
    # F'(q), the summed marginal contributions at density q, of three games of n players
    additive = torch.full_like(q, float(n))  # every player alone: order 1
    unanimous = n * q ** (n - 1)  # worth only when all n players are present: order n
    any_one = n * (1 - q) ** (n - 1)  # worth as soon as one player is present: duplicates
    assert utilization_strength(q, additive) == pytest.approx(0.5, abs=1e-6)
    assert utilization_strength(q, unanimous) == pytest.approx(n / (n + 1), abs=1e-5)
    assert utilization_strength(q, any_one) == pytest.approx(1 / (n + 1), abs=1e-5)
    assert utilization_strength(q, torch.zeros_like(q)) == 0.0  # a layer that does not help


def test_snpfi_proposes_keep_ratios_from_the_utilization_strength():
    ctx = context(calib=images(32))
    crit = get_criterion("snpfi")
    ratios = crit.propose_keep_ratios(ctx)
    game = crit._game(ctx)
    assert set(ratios) == {0, 1}
    for g in ctx.prunable_groups():
        assert ratios[g.id] == pytest.approx(min(1.0, max(1 / g.size, game[g.id][1])))
    assert 0.3 < ratios[1] < 0.8  # the inner layer's filters contribute mostly alone


def test_reconstruction_removes_a_duplicated_channel_first_even_when_its_norm_is_largest():
    model = tiny_model()
    with torch.no_grad():  # channel 3 of the inner group duplicates channel 2; both have the largest filters
        model.conv1.weight[2] *= 3
        model.conv1.weight[3] = model.conv1.weight[2]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.bn1, name)[3] = getattr(model.bn1, name)[2]
    ctx = context(model)
    assert set(get_criterion("l1").score(ctx)[1].argsort()[-2:].tolist()) == {2, 3}
    s = get_criterion("reconstruction").score(ctx)[1]
    assert int(s.argmin()) in (2, 3)  # its twin absorbs it through conv2's refit


def test_reconstruction_removes_a_channel_nobody_reads_first():
    s = get_criterion("reconstruction").score(context(dead_consumer_model(2)))[1]
    assert int(s.argmin()) == 2


@pytest.mark.slow
def test_every_criterion_on_the_cifar_resnet_graph():
    from conftest import load_cifar_resnet

    from compressor.graph import build_graph

    graph = build_graph(load_cifar_resnet(20), torch.randn(1, 3, 32, 32))
    calib = images(8).repeat(1, 1, 4, 4)  # 32 x 32
    before = snapshot(graph.model)
    for name in ALL:
        ctx = ScoringContext(model=graph.model, groups=graph.groups, calib=calib, batch_size=4)
        scores = get_criterion(name).score(ctx)
        assert set(scores) == {g.id for g in graph.groups if g.prunable}, name
        for g in ctx.prunable_groups():
            s = scores[g.id]
            assert s.shape == (g.size,) and torch.isfinite(s).all() and (s >= 0).all(), (name, g.root)
            if name != "random":
                assert s.max() > 0, (name, g.root)
    after = snapshot(graph.model)
    for b, a in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(a, b)
    assert before[1:] == after[1:]
    ratios = get_criterion("snpfi").propose_keep_ratios(
        ScoringContext(model=graph.model, groups=graph.groups, calib=calib, batch_size=4)
    )
    assert all(0 < r <= 1 for r in ratios.values()) and len(ratios) == len([g for g in graph.groups if g.prunable])


def test_reconstruction_on_an_inverted_residual_network():
    """Depthwise consumers are skipped, expansion/projection 1x1 convs are used, every group gets scores."""
    import torchvision

    from compressor import graph as graph_mod

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    x = torch.randn(16, 3, 64, 64)
    graph = graph_mod.build_graph(model, x[:1])
    ctx = ScoringContext(model=graph.model, groups=graph.groups, calib=x)
    scores = get_criterion("reconstruction").score(ctx)
    for g in graph.groups:
        if g.prunable:
            assert scores[g.id].shape == (g.size,) and bool(torch.isfinite(scores[g.id]).all())


# ---------------------------------------------------------------- models that output features (no classes)

TARGETED = ["taylor", "lrp", "attribution", "taylor_guided", "snpfi", "dirichlet"]  # explain an output


@pytest.mark.parametrize("name", ALL)
def test_every_criterion_scores_a_feature_output(name):
    model = tiny_model()
    before = snapshot(model)
    ctx = context(model, output="features")
    scores = get_criterion(name).score(ctx)
    again = get_criterion(name).score(context(model, output="features"))
    assert snapshot(model)[1:] == before[1:]
    for g in ctx.prunable_groups():
        s = scores[g.id]
        assert s.shape == (g.size,) and torch.isfinite(s).all() and (s >= 0).all()
        assert torch.equal(s, again[g.id]), "not deterministic for the same seed"


@pytest.mark.parametrize("name", TARGETED)
def test_criteria_that_explain_an_output_explain_the_feature_vector(name):
    logits = get_criterion(name).score(context())
    features = get_criterion(name).score(context(output="features"))
    assert any(not torch.allclose(logits[g], features[g]) for g in (0, 1))


@pytest.mark.parametrize("name", ["taylor", "lrp"])
def test_feature_scores_give_no_importance_to_a_channel_nobody_reads(name):
    s = get_criterion(name).score(context(dead_consumer_model(2), output="features"))[1]
    assert s[2] <= 1e-6 * s.max() and s.max() > 0


def test_taylor_on_features_estimates_the_output_change_of_removing_each_channel():
    """E_r[(a . d<r, f>/da)^2] = ||J a||^2: the squared first-order output change; against the exact
    change of the output when each inner channel is zeroed, the ranking must agree on this small net."""
    model = tiny_model()
    calib = images(96)
    s = get_criterion("taylor").score(context(model, calib=calib, output="features"))[1]
    exact = []
    with torch.no_grad():
        ref = model(calib)
        for c in range(4):
            handle = model.bn1.register_forward_hook(lambda _m, _i, out, c=c: out.index_fill(1, torch.tensor([c]), 0))
            exact.append(float((model(calib) - ref).pow(2).sum()))
            handle.remove()
    assert torch.argsort(s).tolist() == torch.argsort(torch.tensor(exact)).tolist()


def test_feature_targets_project_on_the_own_output_and_losses_measure_relative_error():
    from compressor.criteria._common import output_loss, target_log_prob, target_score, targets

    f = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    t = targets(f, None, "features")
    assert torch.allclose(target_score(f, t), torch.tensor([5.0, 2.0]))  # its own norm
    assert torch.allclose(target_log_prob(f, t), target_score(f, t))
    assert float(output_loss(f, t)) == 0.0
    assert float(output_loss(2 * f, t)) == pytest.approx(1.0)  # ||2f - f||^2 / ||f||^2
    labels = targets(f, None)
    assert labels.tolist() == [1, 1] and torch.allclose(target_score(f, labels), torch.tensor([4.0, 2.0]))
