"""Recovery methods on a tiny hand-pruned Conv-BN-ReLU network (no ../shared data needed)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CompressorError
from compressor.groups import ChannelGroup, GroupMember
from compressor.recovery import RecoveryContext, get_recovery, list_recoveries
from compressor.recovery.bn import reestimate_bn
from compressor.recovery.recipe import DATA_FREE_RECIPE, DEFAULT_RECIPE, run_recipe

# ---------------------------------------------------------------- a tiny net and a hand pruner


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), so channels are correlated as in real data."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear", align_corners=False)


def tiny_groups() -> list[ChannelGroup]:
    spec = [("features.0", "features.1", "features.3", 16), ("features.3", "features.4", "features.6", 32),
            ("features.6", "features.7", "fc", 32)]
    groups = []
    for gid, (conv, bn, consumer, size) in enumerate(spec):
        idx = tuple(range(size))
        groups.append(ChannelGroup(gid, conv, size, [GroupMember(conv, "out", idx), GroupMember(bn, "out", idx),
                                                     GroupMember(consumer, "in", idx)]))
    groups.append(ChannelGroup(3, "fc", 10, [GroupMember("fc", "out", tuple(range(10)))], prunable=False,
                               reason="classifier output"))
    return groups


def hand_prune(model: nn.Module, groups: list[ChannelGroup], plan: dict[int, torch.Tensor]):
    """Physically prune a copy of ``model`` (plain convs, BNs, linears); return (copy, kept record)."""
    pruned = copy.deepcopy(model)
    kept: dict[str, dict[str, list[int]]] = {}
    for g in groups:
        if g.id not in plan:
            continue
        keep = plan[g.id].tolist()
        for m in g.members:
            idx = [m.indices[c] for c in keep]
            t = torch.as_tensor(idx)
            mod = pruned.get_submodule(m.module)
            kept.setdefault(m.module, {})[m.kind] = idx
            with torch.no_grad():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight = nn.Parameter(mod.weight[t].clone())
                    mod.bias = nn.Parameter(mod.bias[t].clone())
                    mod.running_mean = mod.running_mean[t].clone()
                    mod.running_var = mod.running_var[t].clone()
                    mod.num_features = len(idx)
                elif m.kind == "out":
                    mod.weight = nn.Parameter(mod.weight[t].clone())
                    if mod.bias is not None:
                        mod.bias = nn.Parameter(mod.bias[t].clone())
                    if isinstance(mod, nn.Conv2d):
                        mod.out_channels = len(idx)
                    else:
                        mod.out_features = len(idx)
                else:
                    mod.weight = nn.Parameter(mod.weight[:, t].clone())
                    if isinstance(mod, nn.Conv2d):
                        mod.in_channels = len(idx)
                    else:
                        mod.in_features = len(idx)
    return pruned.eval(), kept


def make_case(keep_fraction: float = 0.5, seed: int = 0, calib_n: int = 256):
    torch.manual_seed(seed)
    model = Tiny()
    reestimate_bn(model, images(256, seed + 100), 128, "cpu")  # realistic BN statistics for this data
    for m in model.modules():  # non-trivial BN affine parameters
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    groups = tiny_groups()
    # keep the channels with the largest L1 norm, as the l1 criterion would
    plan = {}
    for g in groups[:3]:
        conv = model.get_submodule(g.root)
        score = conv.weight.detach().abs().flatten(1).sum(1)
        plan[g.id] = torch.sort(torch.argsort(score, descending=True)[: int(g.size * keep_fraction)]).values
    pruned, kept = hand_prune(model, groups, plan)
    ctx = RecoveryContext(original=model, pruned=pruned, groups=groups, plan=plan, kept=kept,
                          calib=images(calib_n, seed + 1), batch_size=64)
    return ctx


@torch.no_grad()
def distortion(original: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    return float(F.mse_loss(pruned(x), original(x)))


HELD_OUT = images(256, 999)


@pytest.fixture(autouse=True)
def short_mimic(monkeypatch):
    """Fewer gradient steps for ``mimic`` and ``block`` than their defaults: the tiny network converges in fewer."""
    from compressor.recovery import blockwise, mimic

    monkeypatch.setattr(mimic, "STEPS", 60)
    monkeypatch.setattr(blockwise, "STEPS", 30)

# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list_recoveries())
def test_method_runs_keeps_shapes_and_reduces_distortion(name):
    # averaged over three random networks: a single random net need not respond to BN re-estimation
    totals = [0.0, 0.0]
    for seed in range(3):
        before, after = _check_method(name, seed)
        totals[0] += before
        totals[1] += after
    before, after = totals
    if name in ("bn", "bias", "lsq", "mimic", "block", "lsq_block"):
        assert after < before, (name, before, after)
    else:  # data-free merging may find nothing to merge in random weights, but must not blow up
        assert after < before * 1.5, (name, before, after)


def _check_method(name: str, seed: int) -> tuple[float, float]:
    ctx = make_case(seed=seed)
    original_state = {k: v.clone() for k, v in ctx.original.state_dict().items()}
    shapes = {k: v.shape for k, v in ctx.pruned.state_dict().items()}
    before = distortion(ctx.original, ctx.pruned, HELD_OUT)
    method = get_recovery(name)
    method.apply(ctx if method.needs_data else dataclasses.replace(ctx, calib=None))
    after_shapes = {k: v.shape for k, v in ctx.pruned.state_dict().items()}
    for k, shape in shapes.items():
        assert after_shapes[k] == shape, k
    assert ctx.pruned(HELD_OUT[:4]).shape == (4, 10)
    assert not ctx.pruned.training
    for k, v in ctx.original.state_dict().items():  # the original is never modified
        assert torch.equal(v, original_state[k]), k
    after = distortion(ctx.original, ctx.pruned, HELD_OUT)
    assert after == after  # finite
    return before, after


@pytest.mark.parametrize("name", list_recoveries())
def test_methods_needing_data_refuse_without_it(name):
    ctx = dataclasses.replace(make_case(), calib=None)
    method = get_recovery(name)
    if method.needs_data:
        with pytest.raises(CompressorError, match="calibration"):
            method.apply(ctx)
        with pytest.raises(CompressorError):
            run_recipe([name], ctx)
    else:
        method.apply(ctx)


def test_lsq_reduces_distortion_a_lot_and_uses_no_labels():
    ctx = make_case(keep_fraction=0.5)
    before = distortion(ctx.original, ctx.pruned, HELD_OUT)
    get_recovery("lsq").apply(ctx)
    after = distortion(ctx.original, ctx.pruned, HELD_OUT)
    assert after < 0.5 * before, (before, after)


def test_datafree_merges_an_exact_duplicate_channel_exactly():
    torch.manual_seed(0)
    model = Tiny()
    reestimate_bn(model, images(256, 5), 128, "cpu")
    conv, bn = model.features[3], model.features[4]
    with torch.no_grad():  # channel 1 == 2 x channel 0 after BN + ReLU
        conv.weight[1] = conv.weight[0]
        bn.running_mean[1], bn.running_var[1] = bn.running_mean[0], bn.running_var[0]
        bn.weight[1], bn.bias[1] = 2 * bn.weight[0], 2 * bn.bias[0]
    groups = tiny_groups()
    plan = {1: torch.tensor([0] + list(range(2, 32)))}
    pruned, kept = hand_prune(model.eval(), groups, plan)
    ctx = RecoveryContext(original=model, pruned=pruned, groups=groups, plan=plan, kept=kept, calib=None)
    x = images(32, 7)
    assert distortion(model, pruned, x) > 1e-6
    get_recovery("datafree").apply(ctx)
    assert distortion(model, pruned, x) < 1e-9


def test_grouped_and_depthwise_convs_are_refit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU(), nn.Conv2d(16, 8, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    groups = [ChannelGroup(0, "0", 16, [GroupMember("0", "out", tuple(range(16)))])]
    plan = {0: torch.arange(0, 16, 2)}
    pruned = copy.deepcopy(model)
    with torch.no_grad():  # zero the removed producer channels instead of removing them (shapes unchanged)
        pruned[0].weight[1::2] = 0
        pruned[0].bias[1::2] = 0
    kept = {"2": {"in": list(range(16))}}  # pretend the dw conv consumes changed inputs
    calib = images(128, 3)
    ctx = RecoveryContext(original=model, pruned=pruned, groups=groups, plan=plan, kept=kept, calib=calib)
    held = images(64, 4)
    before = distortion(model, pruned, held)
    get_recovery("lsq").apply(ctx)
    assert pruned[2].weight.shape == (16, 1, 3, 3) and pruned[4].weight.shape == (8, 8, 1, 1)
    assert pruned[2].bias is not None
    assert distortion(model, pruned, held) < before


def test_recipe_reports_steps_and_fidelity():
    lines = []
    ctx = dataclasses.replace(make_case(calib_n=512), log=lines.append)
    info = run_recipe(list(DEFAULT_RECIPE), ctx)
    assert [s["name"] for s in info["steps"]] == list(DEFAULT_RECIPE)
    fid = info["fidelity"]
    assert fid["held_out"] and fid["images"] == 64
    assert fid["after"]["kl"] < fid["before"]["kl"]
    assert 0.0 <= fid["after"]["top1_agreement"] <= 1.0
    # progress: each method says when it starts and ends (some run for minutes), then the held-out result
    starts = [i for i, line in enumerate(lines) if line.endswith(": running")]
    assert [lines[i].split(" (")[0] for i in starts] == list(DEFAULT_RECIPE)
    assert all(any(line.startswith(f"{n}: done in ") for line in lines) for n in DEFAULT_RECIPE)
    assert lines[-1].startswith("held-out images (64): KL divergence from the original ")
    free = run_recipe(list(DATA_FREE_RECIPE), dataclasses.replace(make_case(), calib=None))
    assert "fidelity" not in free and free["steps"][0]["name"] == "datafree"


def test_recipe_that_leaves_held_out_images_further_from_the_original_is_undone(monkeypatch):
    from compressor.recovery import recipe as recipe_mod
    from compressor.recovery.base import RecoveryMethod

    class Harmful(RecoveryMethod):
        name = "harmful"

        def apply(self, ctx):
            with torch.no_grad():
                for m in ctx.pruned.modules():
                    if isinstance(m, nn.Conv2d):
                        m.weight.mul_(-1.0)
                        m.bias = nn.Parameter(torch.ones(m.out_channels))  # a parameter the model did not have

    ctx = make_case(calib_n=512)
    x = ctx.calib[:8]
    with torch.no_grad():
        expected = ctx.pruned(x)
    had_bias = [m.bias is not None for m in ctx.pruned.modules() if isinstance(m, nn.Conv2d)]
    monkeypatch.setattr(recipe_mod, "get_recovery", lambda n: Harmful() if n == "harmful" else get_recovery(n))
    info = run_recipe(["harmful"], ctx)
    assert info["reverted"] and info["fidelity"]["after"] == info["fidelity"]["before"]
    with torch.no_grad():
        assert torch.equal(ctx.pruned(x), expected)
    assert [m.bias is not None for m in ctx.pruned.modules() if isinstance(m, nn.Conv2d)] == had_bias
    helpful = run_recipe(list(DEFAULT_RECIPE), make_case(calib_n=512))
    assert "reverted" not in helpful


def test_the_recipe_holds_out_source_images_with_their_copies_and_grades_on_the_images_themselves(monkeypatch):
    from compressor import augment
    from compressor.recovery import recipe as recipe_mod
    from compressor.recovery.base import RecoveryMethod

    seen = {}

    class Spy(RecoveryMethod):
        name = "spy"

        def apply(self, ctx):
            seen["calib"], seen["sources"] = ctx.calib, ctx.sources

    monkeypatch.setattr(recipe_mod, "get_recovery", lambda n: Spy() if n == "spy" else get_recovery(n))
    case = make_case(calib_n=256)
    calib, sources = augment.expand(case.calib, 1024)
    info = recipe_mod.run_recipe(["spy"], dataclasses.replace(case, calib=calib, sources=sources))
    assert info["fidelity"]["held_out"] and info["fidelity"]["images"] == 32  # 256 // 8 source images
    trained = set(seen["sources"].tolist())
    assert len(trained) == 224 and len(seen["calib"]) == 224 * 4
    few = make_case(calib_n=64)
    calib, sources = augment.expand(few.calib, 512)
    info = recipe_mod.run_recipe(["spy"], dataclasses.replace(few, calib=calib, sources=sources))
    assert not info["fidelity"]["held_out"] and info["fidelity"]["images"] == 64 and len(seen["calib"]) == 512


def test_recipe_rejects_unknown_names():
    with pytest.raises(CompressorError, match="unknown recovery method"):
        run_recipe(["nope"], make_case())


def test_allocate_widths_meets_target_and_honours_constraints():
    from compressor import graph as graph_mod
    from compressor.sensitivity import allocate_widths

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    prunable = [g for g in graph.groups if g.prunable]
    assert prunable
    prunable[0].min_channels = 6
    prunable[-1].multiple = 4
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in prunable}
    full = graph_mod.estimate_macs(graph, {g.id: g.size for g in prunable})
    counts = allocate_widths(graph, scores, images(64, 11), 0.5 * full)
    assert graph_mod.estimate_macs(graph, counts) <= 0.5 * full
    for g in prunable:
        assert g.min_channels <= counts[g.id] <= g.size
        assert counts[g.id] % g.multiple == 0 or counts[g.id] == g.size
    with pytest.raises(CompressorError):
        allocate_widths(graph, scores, images(64, 11), 1.0)


def test_allocate_widths_measures_widths_below_the_narrowest_probe(monkeypatch):
    """A cliff below the probed widths (as when a network's last conv is cut to one channel) is measured
    and avoided, not extrapolated as free."""
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    prunable = [g for g in graph.groups if g.prunable]
    costly = max(prunable, key=lambda g: g.size)
    narrowest = min(sensitivity.PROBE_RATIOS)
    lowest_ok = {g.id: int(round(narrowest * g.size)) for g in prunable}
    measured = []

    def distortion(self, plan, refit=True):
        ((gid, kept),) = plan.items()
        measured.append((gid, len(kept)))
        if gid == costly.id:  # steadily costly
            return 1.0 - len(kept) / costly.size
        return 0.0 if len(kept) >= lowest_ok[gid] else 1e3  # free down to the narrowest probe, a cliff below

    monkeypatch.setattr(sensitivity._Prober, "distortion", distortion)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in prunable}
    floor = {g.id: (1 if g.id == costly.id else lowest_ok[g.id]) for g in prunable}
    target = 1.05 * graph_mod.estimate_macs(graph, floor)
    counts = sensitivity.allocate_widths(graph, scores, images(64, 11), target)
    assert graph_mod.estimate_macs(graph, counts) <= target
    assert all(counts[g.id] >= lowest_ok[g.id] for g in prunable if g.id != costly.id), counts
    assert any(c < lowest_ok[gid] for gid, c in measured), measured  # the refinement looked below the probes


@pytest.mark.parametrize("ratios", [None, (0.5,), (0.9, 0.7, 0.5, 0.25)])
def test_allocate_widths_probes_the_given_widths(monkeypatch, ratios):
    """Each group is probed at its rounded probe widths (PROBE_RATIOS by default), and below them only
    where the allocation refines a width under the narrowest probe."""
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    prunable = [g for g in graph.groups if g.prunable]
    measured: dict[int, set[int]] = {g.id: set() for g in prunable}
    sizes = {g.id: g.size for g in prunable}

    def distortion(self, plan, refit=True):
        ((gid, kept),) = plan.items()
        measured[gid].add(len(kept))
        return 1.0 - len(kept) / sizes[gid]

    monkeypatch.setattr(sensitivity._Prober, "distortion", distortion)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in prunable}
    full = graph_mod.estimate_macs(graph, {g.id: g.size for g in prunable})
    kwargs = {} if ratios is None else {"ratios": ratios}
    counts = sensitivity.allocate_widths(graph, scores, images(64, 11), 0.6 * full, **kwargs)
    assert graph_mod.estimate_macs(graph, counts) <= 0.6 * full
    for g in prunable:
        expected = {int(round(g.size * r)) for r in (ratios or sensitivity.PROBE_RATIOS)} - {g.size}
        assert expected <= measured[g.id], (g.root, sorted(measured[g.id]))
        assert measured[g.id] - expected <= {c for c in measured[g.id] if c < min(expected)}  # refinements only


def test_allocate_widths_with_a_cache_probes_once_for_every_target(monkeypatch):
    """The latency search allocates for several FLOPs targets: the probes are measured for the first only."""
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    prunable = [g for g in graph.groups if g.prunable]
    calls = []

    def distortion(self, plan, refit=True):
        ((gid, kept),) = plan.items()
        calls.append((gid, len(kept)))
        return 1.0 - len(kept) / graph.groups[gid].size

    monkeypatch.setattr(sensitivity._Prober, "distortion", distortion)
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in prunable}
    full = graph_mod.estimate_macs(graph, {g.id: g.size for g in prunable})
    calib, cache = images(64, 11), {}
    first = sensitivity.allocate_widths(graph, scores, calib, 0.6 * full, cache=cache)
    probed = len(calls)
    assert probed >= len(prunable) and set(cache) == {"prober", "curves"}
    assert sensitivity.allocate_widths(graph, scores, calib, 0.6 * full, cache=cache) == first
    lower = sensitivity.allocate_widths(graph, scores, calib, 0.4 * full, cache=cache)
    assert graph_mod.estimate_macs(graph, lower) <= 0.4 * full
    # afterwards only refinements below the probed widths, never a width measured before
    assert not set(calls[probed:]) & set(calls[:probed])
    assert len(calls) - probed <= 2 * len(prunable) * sensitivity.MAX_REFINE_ROUNDS


@pytest.mark.parametrize("calib_size, probe, fit", [(64, 16, 48), (128, 64, 64), (1024, 64, 64)])
def test_probe_slice_leaves_images_for_the_refits(monkeypatch, calib_size, probe, fit):
    """64 probe images when there are enough; 16 on small sets, so the refits keep at least 48 others."""
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    calib = images(calib_size, 3)
    seen = {}
    real = sensitivity._consumer_grams

    def capture(graph_, fit_images, device):
        seen["fit"] = fit_images
        return real(graph_, fit_images, device)

    monkeypatch.setattr(sensitivity, "_consumer_grams", capture)
    prober = sensitivity._make_prober(graph, calib, "cpu")
    assert len(prober.probe) == probe
    assert len(seen["fit"]) == fit
    distance = torch.cdist(prober.probe.flatten(1), seen["fit"].flatten(1))
    assert float(distance.min()) > 0, "a probe image was also used for the refits"


def test_probe_slice_shrinks_to_fit_the_activation_cache(monkeypatch):
    """The prober caches every activation of the original on its probe images: with large inputs it takes
    fewer images rather than exhaust memory."""
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    calib = images(1024, 3)
    full = sensitivity._make_prober(graph, calib, "cpu", refit=False)
    assert len(full.probe) == sensitivity.PROBE_IMAGES
    per_image = full._bytes_per_image()
    monkeypatch.setattr(sensitivity, "CACHE_BUDGET", 10.5 * per_image)
    small = sensitivity._make_prober(graph, calib, "cpu", refit=False)
    assert len(small.probe) == 10
    cached = sum(v.numel() * v.element_size() for v in small.cache.values() if isinstance(v, torch.Tensor))
    assert cached <= sensitivity.CACHE_BUDGET


class TinyResidual(nn.Module):
    """A stem and two residual blocks (identity shortcuts, an in-place ReLU): probes re-run part of it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
                          nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
            for _ in range(2)
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyChannelsLayerNorm(nn.Module):
    """ConvNeXt's pattern: torchvision's LayerNorm2d, whose traced forward passes ``normalized_shape``
    to ``F.layer_norm`` as a constant of the trace."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.convnext import LayerNorm2d

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = LayerNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.conv2(F.gelu(self.norm(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _run_traced(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """``model(x)`` node by node, with ``run_node``'s bfloat16 rule when ``bf16``."""
    from torch import fx

    from compressor.recovery.lsq import run_node

    gm = fx.symbolic_trace(model)
    env: dict = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a])
            env[node] = run_node(gm, node, env, x, bf16)
    raise AssertionError("no output node")


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", [TinyResidual, TinyChannelsLayerNorm])
def test_probe_equals_running_the_pruned_model(arch, bf16, monkeypatch):
    """A probe re-runs only what the pruning changed, from cached activations it drops after their last
    reader: its distortion must equal that of the whole pruned model on the probe images, every time
    (run with the same arithmetic: on a CPU with native bfloat16, its 3x3 convolutions in bfloat16)."""
    from compressor import graph as graph_mod
    from compressor import sensitivity
    from compressor.recovery.common import bf16_supported

    monkeypatch.setenv("COMPRESS_BF16", "1" if bf16 else "0")
    if bf16 and not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bfloat16: the probes run in float32")
    torch.manual_seed(0)
    model = arch().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    graph = graph_mod.build_graph(model, images(1, 0))
    prober = sensitivity._make_prober(graph, images(96, 5), "cpu", refit=False)
    assert prober.bf16 == bf16
    prunable = [g for g in graph.groups if g.prunable]
    assert len(prunable) >= 2
    for g in prunable:
        plan = {g.id: torch.arange(0, g.size, 2)}
        pruned = graph_mod.apply_plan(graph, plan)
        expected = sensitivity._distortion(_run_traced(model, prober.probe, bf16),
                                           _run_traced(pruned.model, prober.probe, bf16))
        first = prober.distortion(plan, refit=False)
        assert first == pytest.approx(expected, rel=1e-4, abs=1e-7), g.root
        assert expected > 0
        assert prober.distortion(plan, refit=False) == first  # the cached activations were left intact


def test_lsq_without_fx_tracing_uses_hooks_and_still_helps():
    from compressor.recovery.lsq import LeastSquaresReconstruction

    ctx = make_case()
    before = distortion(ctx.original, ctx.pruned, HELD_OUT)
    LeastSquaresReconstruction(residual=False).apply(ctx)  # the hook path (no residual targets)
    assert distortion(ctx.original, ctx.pruned, HELD_OUT) < 0.5 * before


def _post_relu_error(ctx, relu_aware: bool, monkeypatch) -> tuple[float, dict]:
    import compressor.recovery.lsq as lsq

    monkeypatch.setattr(lsq, "RELU_AWARE", relu_aware)
    method = get_recovery("lsq")
    method.apply(ctx)
    outs = {}
    hooks = [m.get_submodule("features.5").register_forward_hook(lambda _m, _i, o, key=key: outs.__setitem__(key, o))
             for key, m in (("o", ctx.original), ("p", ctx.pruned))]
    with torch.no_grad():
        ctx.original(ctx.calib)
        ctx.pruned(ctx.calib)
    for h in hooks:
        h.remove()
    kept = torch.as_tensor(ctx.kept["features.4"]["out"])
    return float(((outs["p"] - outs["o"][:, kept]) ** 2).mean()), method.last_info


def test_lsq_relu_aware_fit_lowers_the_error_after_the_relu(monkeypatch):
    errors = {}
    for aware in (False, True):
        errors[aware], info = _post_relu_error(make_case(keep_fraction=0.5), aware, monkeypatch)
        assert info["features.3"]["relu_aware"] is aware
    # the plain fit spends effort matching negative pre-activations the ReLU discards anyway
    assert errors[True] < 0.95 * errors[False], errors


def test_mimic_after_lsq_lowers_the_feature_error_further():
    from compressor.recovery.mimic import mimic

    ctx = make_case(keep_fraction=0.5)
    get_recovery("lsq").apply(ctx)
    info = mimic(ctx.original, ctx.pruned, ctx.kept, ctx.calib)
    assert info["status"] == "refit"
    assert info["held_out_after"] < info["held_out_before"], info
    assert all(p.grad is None for p in ctx.pruned.parameters())


def test_mimic_keeps_the_weights_when_the_steps_make_held_out_images_worse(monkeypatch):
    from compressor.recovery import mimic as mimic_mod

    ctx = make_case(keep_fraction=0.5)
    get_recovery("lsq").apply(ctx)
    state = {k: v.clone() for k, v in ctx.pruned.state_dict().items()}
    monkeypatch.setattr(mimic_mod, "LEARNING_RATE", 10.0)  # diverges
    method = get_recovery("mimic")
    method.apply(ctx)
    assert method.last_info["status"] == "kept", method.last_info
    for k, v in ctx.pruned.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_block_after_lsq_lowers_each_blocks_held_out_error():
    ctx = make_case(keep_fraction=0.5)
    get_recovery("lsq").apply(ctx)
    before = distortion(ctx.original, ctx.pruned, HELD_OUT)
    flags = [p.requires_grad for p in ctx.pruned.parameters()]
    method = get_recovery("block")
    method.apply(ctx)
    blocks = method.last_info["blocks"]
    assert [b["end"] for b in blocks] == ["features_5", "fc"]  # after conv-BN-ReLU x2, then up to the logits
    assert all(b["status"] == "refit" and b["after"] < b["before"] for b in blocks), blocks
    assert distortion(ctx.original, ctx.pruned, HELD_OUT) < before
    assert all(p.grad is None for p in ctx.pruned.parameters())
    assert [p.requires_grad for p in ctx.pruned.parameters()] == flags


def test_block_keeps_a_blocks_weights_when_the_steps_make_held_out_images_worse(monkeypatch):
    from compressor.recovery import blockwise

    ctx = make_case(keep_fraction=0.5)
    get_recovery("lsq").apply(ctx)
    state = {k: v.clone() for k, v in ctx.pruned.state_dict().items()}
    monkeypatch.setattr(blockwise, "LEARNING_RATE", 1e3)  # one step this size throws the weights far off
    monkeypatch.setattr(blockwise, "STEPS", 1)
    method = get_recovery("block")
    method.apply(ctx)
    assert {b["status"] for b in method.last_info["blocks"]} == {"kept"}, method.last_info
    for k, v in ctx.pruned.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_blocks_of_a_residual_network_end_after_each_residual_relu():
    import torchvision
    from torch import fx

    from compressor.recovery.blockwise import find_blocks

    gm = fx.symbolic_trace(torchvision.models.resnet18(num_classes=10))
    blocks = find_blocks(gm)
    ends = [body[-1].name for _, body in blocks]
    assert ends == [f"layer{i}_{j}_relu_1" for i in range(1, 5) for j in range(2)][:-1] + ["flatten", "fc"]
    covered = [n for _, body in blocks for n in body]
    assert covered == [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    for start, body in blocks:  # nothing but the block's input flows into a block from before it
        inside = {start, *body}
        assert all(a in inside or a.op == "get_attr" for n in body for a in n.all_input_nodes)


def test_block_skips_a_model_fx_cannot_trace_and_says_so(monkeypatch):
    from compressor.recovery import blockwise

    ctx = make_case()
    state = {k: v.clone() for k, v in ctx.pruned.state_dict().items()}
    monkeypatch.setattr(blockwise, "_trace_pair", lambda original, pruned: None)
    lines = []
    get_recovery("block").apply(dataclasses.replace(ctx, log=lines.append))
    assert lines == ["block: skipped (not fx-traceable)"]
    for k, v in ctx.pruned.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("depth", [20, 0])
def test_lsq_block_without_steps_equals_lsq(monkeypatch, depth):
    """Block by block, each layer's least-squares refit sees the same input, targets and sampled positions as
    in ``lsq``'s one pass: with no steps the two give the same outputs (a CIFAR ResNet with pruned zero-padded
    shortcuts, whose residual targets need the shortcut computed first; and the plain tiny network)."""
    from conftest import load_cifar_resnet, randomize_bn

    from compressor import graph as G
    from compressor.recovery import blockwise

    monkeypatch.setattr(blockwise, "STEPS", 0)
    monkeypatch.setenv("COMPRESS_BF16", "0")  # float32 passes between the blocks, as in lsq
    if depth:
        graph = G.build_graph(randomize_bn(load_cifar_resnet(depth)), torch.randn(1, 3, 32, 32))
        plan = G.random_plan(graph, 0.5, seed=0)
        pruned = G.apply_plan(graph, plan)
        ctx = RecoveryContext(original=graph.model, pruned=pruned.model, groups=graph.groups, plan=plan,
                              kept=pruned.kept, calib=images(96, 3))
    else:
        ctx = make_case(keep_fraction=0.5)
    alone = dataclasses.replace(ctx, pruned=copy.deepcopy(ctx.pruned))
    unrepaired = copy.deepcopy(ctx.pruned)
    get_recovery("lsq").apply(alone)
    method = get_recovery("lsq_block")
    method.apply(ctx)
    assert all(b["least_squares"] > 0 for b in method.last_info["blocks"][1:]), method.last_info
    with torch.no_grad():  # equal up to float rounding (the passes run in batches of different sizes)
        expected, got = alone.pruned(HELD_OUT), ctx.pruned(HELD_OUT)
        before = unrepaired(HELD_OUT)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-3 * scale
    assert float((before - expected).abs().max()) > 1e-2 * scale  # the refit changed the outputs


def test_lsq_block_steps_after_each_blocks_least_squares():
    ctx = make_case(keep_fraction=0.5)
    alone = dataclasses.replace(ctx, pruned=copy.deepcopy(ctx.pruned))
    get_recovery("lsq").apply(alone)
    method = get_recovery("lsq_block")
    method.apply(ctx)
    blocks = method.last_info["blocks"]
    assert [b["least_squares"] for b in blocks] == [1, 2], blocks  # the first conv reads the image: not refit
    assert all((b["status"] == "refit") == (b["after"] < b["before"]) for b in blocks), blocks
    assert any(b["status"] == "refit" for b in blocks), blocks
    assert distortion(ctx.original, ctx.pruned, HELD_OUT) < distortion(alone.original, alone.pruned, HELD_OUT)


def test_lsq_block_falls_back_to_lsq_when_fx_cannot_trace(monkeypatch):
    from compressor.recovery import blockwise

    ctx = make_case(keep_fraction=0.5)
    before = distortion(ctx.original, ctx.pruned, HELD_OUT)
    monkeypatch.setattr(blockwise, "_trace_pair", lambda original, pruned: None)
    lines = []
    method = get_recovery("lsq_block")
    method.apply(dataclasses.replace(ctx, log=lines.append))
    assert lines == ["lsq_block: no block steps (not fx-traceable); least squares alone"]
    assert method.last_info["lsq"]
    assert distortion(ctx.original, ctx.pruned, HELD_OUT) < 0.5 * before


def test_block_fits_every_block_of_a_cifar_resnet_with_pruned_zero_padded_shortcuts(monkeypatch):
    """Channel indices must be followed through the shortcuts' channel scatter, or later blocks go unfitted."""
    from conftest import load_cifar_resnet, randomize_bn

    from compressor import graph as G
    from compressor.recovery import blockwise

    monkeypatch.setattr(blockwise, "STEPS", 2)
    graph = G.build_graph(randomize_bn(load_cifar_resnet(20)), torch.randn(1, 3, 32, 32))
    plan = G.random_plan(graph, 0.5, seed=0)
    pruned = G.apply_plan(graph, plan)
    info = blockwise.reconstruct_blocks(graph.model, pruned.model, pruned.kept, images(64, 3))
    assert len(info["blocks"]) == 10  # the stem with the first residual block, eight more blocks, the head
    assert all("before" in b for b in info["blocks"]), [b for b in info["blocks"] if "before" not in b]


def _plain_convnet() -> nn.Module:
    layers: list[nn.Module] = []
    for cin, cout in ((3, 8), (8, 8), (8, 16), (16, 16), (16, 16), (16, 16)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        if cout == 16 and cin == 8:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("arch", ["resnet18", "plain"])
def test_block_crops_leave_out_every_output_position_a_cut_edge_reaches(arch):
    """With a block's own output as the target, the loss on its random crops is zero: the margin is wide enough.

    Covers strided blocks (the crop offsets must stay aligned with the subsampling; resnet18's stem block
    subsamples by 4) and crops that meet the image edge (there the padding is real and the edge rows count).
    """
    import torchvision
    from conftest import randomize_bn
    from torch import fx

    from compressor.recovery import blockwise

    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(24, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    else:
        model, x = _plain_convnet(), F.interpolate(images(24, 5), size=(32, 32))
    gm = fx.symbolic_trace(randomize_bn(model).eval())
    gen = torch.Generator().manual_seed(0)
    cropped = []
    for start, body in blockwise.find_blocks(gm):
        y = blockwise._run_batched(gm, start, body, x)
        geometry = blockwise._crop_geometry(gm, start, body, x, y)
        if geometry is not None:
            cropped.append(geometry)
            for _ in range(20):
                inputs, target, (rows, cols) = blockwise._random_batch(x, y, torch.arange(4), geometry, gen)
                assert inputs.shape[-2:] == (geometry[2], geometry[2]) and target.numel() > 0
                out = blockwise._run_block(gm, start, body, inputs)[..., rows, cols]
                torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
        x = y
    assert len(cropped) >= 2 and all(margin > 0 for _, margin, _ in cropped), cropped
    # each crop leaves INTERIOR x INTERIOR output positions clear of its cut edges
    assert all(crop == stride * (blockwise.INTERIOR + 2 * margin) for stride, margin, crop in cropped), cropped
    if arch == "resnet18":
        assert {stride for stride, _, _ in cropped} >= {1, 2, 4}, cropped


def test_block_never_crops_a_block_whose_output_depends_on_the_whole_image():
    """Squeeze-excitation pools over the whole map: a crop would change every output, so such blocks step whole.

    With random weights the excitation changes the outputs by little; the measurement must see it all the same.
    """
    import torchvision
    from torch import fx

    from compressor.recovery import blockwise

    gm = fx.symbolic_trace(torchvision.models.efficientnet_b0(num_classes=10).eval())
    x = torch.randn(16, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pooled, cropped = 0, 0
    for start, body in blockwise.find_blocks(gm):
        y = blockwise._run_batched(gm, start, body, x)
        geometry = blockwise._crop_geometry(gm, start, body, x, y)
        if any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.AdaptiveAvgPool2d) for n in body):
            pooled += 1
            assert geometry is None, (body[-1].name, geometry)
        cropped += geometry is not None
        x = y
    assert pooled >= 10 and cropped >= 2, (pooled, cropped)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["resnet18", "plain"])
def test_block_steps_with_batchnorm_folded_give_the_unfolded_outputs_and_gradients(arch, bf16):
    """The steps run each conv and its eval-mode BatchNorm as one convolution; nothing else may change
    (in bfloat16, nothing beyond its rounding: about 3 significant digits, float32 in and out)."""
    import torchvision
    from conftest import randomize_bn
    from torch import fx

    from compressor.recovery import blockwise

    if arch == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(6, 3, 64, 64)
    else:
        model, x = _plain_convnet(), F.interpolate(images(6, 5), size=(32, 32))
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.bias is None:  # a bias too, to cover its folding
            module.bias = nn.Parameter(0.1 * torch.randn(module.out_channels))
    gm = fx.symbolic_trace(randomize_bn(model).eval())
    folded_pairs = 0
    for start, body in blockwise.find_blocks(gm):
        fused = blockwise._fold_batchnorm(gm, body, bf16)
        folded_pairs += len(fused) // 2
        convs = [gm.get_submodule(n.target) for n in body
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
        results = []
        for stand_ins in (None, fused):
            for conv in convs:
                conv.zero_grad()
                conv.weight.requires_grad_(True)
            out = blockwise._run_block(gm, start, body, x, stand_ins)
            if convs and out.requires_grad:
                (out**2).mean().backward()
            grads = [None if c.weight.grad is None else c.weight.grad.clone() for c in convs]
            results.append((out.detach(), grads))
        (out_plain, grads_plain), (out_fused, grads_fused) = results
        assert out_fused.dtype == torch.float32
        tol = 5e-2 if bf16 else 1e-4
        torch.testing.assert_close(out_fused, out_plain, rtol=tol, atol=tol * float(out_plain.abs().max()))
        for plain, folded in zip(grads_plain, grads_fused, strict=True):
            assert (plain is None) == (folded is None)
            if plain is not None:
                assert folded.dtype == torch.float32
                tol = 1e-1 if bf16 else 1e-3
                torch.testing.assert_close(folded, plain, rtol=tol, atol=tol * float(plain.abs().max()))
        with torch.no_grad():
            x = blockwise._run_block(gm, start, body, x)
    assert folded_pairs >= (16 if arch == "resnet18" else 6), folded_pairs


def test_block_steps_keep_depthwise_and_pointwise_convolutions_in_float32():
    """bfloat16 made depthwise convolutions slower; only ungrouped convolutions wider than 1x1 use it."""
    from torch import fx

    from compressor.recovery import blockwise

    def conv_bn(cin, cout, k, groups=1):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]

    model = nn.Sequential(*conv_bn(3, 8, 3), *conv_bn(8, 8, 3, groups=8), *conv_bn(8, 16, 1)).eval()
    gm = fx.symbolic_trace(model)
    body = [n for n in gm.graph.nodes if n.op == "call_module"]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact, low = blockwise._fold_batchnorm(gm, body, False), blockwise._fold_batchnorm(gm, body, True)
    inputs = {"0": x, "2": torch.randn(2, 8, 8, 8), "4": torch.randn(2, 8, 8, 8)}
    same = {n.target: torch.equal(exact[n](inputs[n.target]), low[n](inputs[n.target])) for n in body if n in exact
            and isinstance(gm.get_submodule(n.target), nn.Conv2d)}
    assert same == {"0": False, "2": True, "4": True}, same


def test_block_passes_in_bfloat16_round_only_dense_spatial_convolutions():
    """The passes that carry each block's input and target along run 3x3 convolutions in bfloat16
    (float32 out, close to the float32 pass); depthwise and 1x1 convolutions stay exact."""
    from torch import fx

    from compressor.recovery import blockwise

    def run(model, x, bf16):
        gm = fx.symbolic_trace(model.eval())
        body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        start = next(n for n in gm.graph.nodes if n.op == "placeholder")
        return blockwise._run_batched(gm, start, body, x, bf16)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 10, 10, generator=gen)
    for model, exact in ((nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)), True),
                         (nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3)), False)):
        plain, low = run(model, x, False), run(model, x, True)
        assert low.dtype == torch.float32 and low.shape == plain.shape
        assert torch.equal(low, plain) == exact
        torch.testing.assert_close(low, plain, rtol=5e-2, atol=5e-2 * float(plain.abs().max()))
        double = model.double()
        assert torch.equal(run(double, x.double(), True), run(double, x.double(), False))  # float64 stays exact


def test_bfloat16_only_on_a_cpu_with_native_support(monkeypatch):
    from compressor.recovery.common import bf16_supported

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.delenv("COMPRESS_BF16", raising=False)
    assert bf16_supported("cpu") == native
    assert not bf16_supported("cuda")
    monkeypatch.setenv("COMPRESS_BF16", "0")
    assert not bf16_supported("cpu")


def test_block_cosine_adam_takes_torch_adams_steps_under_a_cosine_schedule():
    from compressor.recovery.blockwise import CosineAdam

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    ours = [t.clone().requires_grad_(True) for t in start]
    ref = [t.clone().requires_grad_(True) for t in start]
    opt = CosineAdam(ours, lr=0.05, steps=7)
    ref_opt = torch.optim.Adam(ref, lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, 7)
    for step in range(7):
        target = torch.randn(5, 3, generator=gen)
        for params, optimizer in ((ours, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            (((params[0] - target) ** 2).sum() + (params[1] ** 3).sum()).backward()
            optimizer.step()
        sched.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert not torch.equal(ours[0], start[0])


def test_spread_takes_evenly_spaced_images_from_first_to_last():
    from compressor.recovery.common import spread

    x = torch.arange(10.0)[:, None]
    assert spread(x, 4).flatten().tolist() == [0.0, 3.0, 6.0, 9.0]
    assert spread(x, 10) is x and spread(x, 50) is x


def test_lsq_with_fewer_images_than_given_takes_them_from_the_whole_calibration_set(monkeypatch):
    """Image folders load class by class: a memory cap must not leave lsq with only the first classes."""
    from compressor.recovery import lsq
    from compressor.recovery.common import spread

    sorted_calib = torch.cat([images(64, 1), 3 * images(64, 2).flip(1)])  # two "classes", one after the other
    cap = 32
    fitted = []
    for calib, capped in ((sorted_calib, True), (spread(sorted_calib, cap), False), (sorted_calib[:cap], False)):
        ctx = dataclasses.replace(make_case(), calib=calib)
        with monkeypatch.context() as patch:
            if capped:
                patch.setattr(lsq, "image_cap", lambda model, images, device: cap)
            get_recovery("lsq").apply(ctx)
        fitted.append(ctx.pruned.features[3].weight.detach().clone())
    capped_run, spread_run, prefix_run = fitted
    torch.testing.assert_close(capped_run, spread_run)
    assert not torch.allclose(capped_run, prefix_run, atol=1e-4)


@pytest.mark.parametrize(("single_allowed", "expected"), [(True, 1), (False, None)])
def test_the_allocation_steps_from_the_alignment_to_a_single_channel(single_allowed, expected):
    """An aligned group shrinks 16 -> 8 -> 1 where one channel is allowed; otherwise 8 is its floor."""
    from compressor import budget as budget_mod
    from compressor import sensitivity
    from compressor.errors import BudgetError
    from compressor.groups import ChannelGroup

    group = ChannelGroup(id=0, root="c", size=16, multiple=8, single_allowed=single_allowed)
    by_id, curves = {0: group}, {0: [(16, 0.0), (8, 0.1)]}
    floor = budget_mod.min_counts([group])
    estimate = lambda counts: 10.0 * counts[0]  # noqa: E731
    change = lambda counts, gid, new: 10.0 * (new - counts[gid])  # noqa: E731
    if expected is None:
        with pytest.raises(BudgetError):
            sensitivity._greedy(by_id, curves, floor, estimate, change, target_macs=50.0)
        return
    counts, macs = sensitivity._greedy(by_id, curves, floor, estimate, change, target_macs=50.0)
    assert counts == {0: expected} and macs == 10.0


def test_fidelity_kl_is_never_negative():
    from compressor.recovery.recipe import fidelity

    torch.manual_seed(4)
    original = nn.Linear(64, 10)
    nearly = copy.deepcopy(original)
    with torch.no_grad():
        nearly.weight.add_(torch.randn_like(nearly.weight) * 1e-7)  # summed in float32, this KL rounds below zero
    result = fidelity(original, nearly, torch.randn(256, 64), batch_size=256)
    assert result["kl"] >= 0.0 and result["top1_agreement"] == 1.0


def test_feature_outputs_are_measured_by_relative_error_and_cosine():
    from compressor.recovery.recipe import fidelity

    ctx = make_case(calib_n=512)
    x = ctx.calib[:32]
    same = fidelity(ctx.original, ctx.original, x, output="features")
    assert set(same) == {"cosine", "distortion"}
    assert same["distortion"] == 0.0 and same["cosine"] == pytest.approx(1.0, abs=1e-6)

    class Doubled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v):
            return 2 * self.inner(v)

    doubled = fidelity(ctx.original, Doubled(ctx.original), x, output="features")
    assert doubled["distortion"] == pytest.approx(1.0, rel=1e-5)  # ||2o - o||^2 / ||o||^2
    assert doubled["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_recipe_on_a_feature_output_reports_and_reduces_the_relative_error():
    lines = []
    ctx = dataclasses.replace(make_case(calib_n=512), log=lines.append, output="features")
    info = run_recipe(list(DEFAULT_RECIPE), ctx)
    fid = info["fidelity"]
    assert set(fid["after"]) == {"cosine", "distortion"} and "reverted" not in info
    assert fid["after"]["distortion"] < fid["before"]["distortion"]
    assert fid["after"]["cosine"] > fid["before"]["cosine"]
    assert lines[-1].startswith("held-out images (64): relative squared error of the output ")


def test_allocation_measures_a_feature_output_by_its_relative_error(monkeypatch):
    from compressor import graph as graph_mod
    from compressor import sensitivity

    ref = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
    out = ref + torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.3]])
    expected = float(((out - ref) ** 2).mean() / ref.var())
    assert sensitivity._distortion(ref, out, "features") == pytest.approx(expected)
    assert sensitivity._distortion(ref, out) != pytest.approx(expected)  # class outputs: a KL divergence

    seen = []
    real = sensitivity._distortion
    monkeypatch.setattr(sensitivity, "_distortion",
                        lambda r, o, output="logits": seen.append(output) or real(r, o, output))
    ctx = make_case()
    graph = graph_mod.build_graph(ctx.original, images(1, 0))
    prunable = [g for g in graph.groups if g.prunable]
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in prunable}
    full = graph_mod.estimate_macs(graph, {g.id: g.size for g in prunable})
    counts = sensitivity.allocate_widths(graph, scores, images(64, 11), 0.5 * full, output="features")
    assert graph_mod.estimate_macs(graph, counts) <= 0.5 * full
    assert seen and set(seen) == {"features"}
