"""Invariants of compressor.graph: groups, physical pruning, masking, soundness, MAC counts."""

from __future__ import annotations

import io
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import load_cifar_resnet, randomize_bn
from torch import nn

from compressor import graph as G
from compressor.channel_ops import ChannelScatter
from compressor.graph import prune as graph_prune

torch.set_num_threads(1)


def group_of(graph, module: str, kind: str = "out"):
    return next(g for g in graph.groups if any(m.module == module and m.kind == kind for m in g.members))


def onnx_diff(model: nn.Module, x: torch.Tensor) -> float:
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (x,), buf, opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    return float((torch.from_numpy(y) - ref).abs().max())


@pytest.fixture(scope="module")
def cifar():
    model = randomize_bn(load_cifar_resnet(20))
    return model, G.build_graph(model, torch.randn(1, 3, 32, 32))


@pytest.fixture(scope="module")
def resnet18():
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18())
    return model, G.build_graph(model, torch.randn(1, 3, 64, 64))


def test_cifar_pad_becomes_index_map(cifar):
    model, graph = cifar
    scatters = [n for n, m in graph.model.named_modules() if isinstance(m, ChannelScatter)]
    assert scatters == ["layer2.0.shortcut.channel_pad", "layer3.0.shortcut.channel_pad"]
    # user's module names survive the rewrite
    assert isinstance(graph.model.get_submodule("layer1.0.conv1"), nn.Conv2d)
    assert not hasattr(graph.model, "graph")  # a plain module: the TorchScript ONNX exporter accepts it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), graph.model(x), atol=1e-6)
    # the 16-channel stage and the 32-channel stage are different groups, both prunable
    by_root = {g.root: g for g in graph.groups}
    assert by_root["conv1"].size == 16 and by_root["conv1"].prunable
    stage2 = next(g for g in graph.groups if any(m.module == "layer2.0.bn2" for m in g.members))
    assert stage2.size == 32 and stage2.prunable and stage2.id != by_root["conv1"].id
    assert [g.root for g in graph.excluded] == ["linear"]
    assert "output" in graph.excluded[0].reason
    for g in graph.groups:
        assert g.id == graph.groups.index(g)
        for m in g.members:
            assert len(m.indices) == g.size and m.kind in ("in", "out")


def test_cifar_prune_is_sound(cifar):
    _, graph = cifar
    plan = G.random_plan(graph, 0.5, seed=3)
    pruned = G.apply_plan(graph, plan)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert pruned.model(x).shape == (4, 10)
    assert G.soundness_diff(graph, plan, pruned.model, x) < 1e-4
    # the masked model really differs from the original (the plan removed something)
    with torch.no_grad():
        assert (G.mask_model(graph, plan)(x) - graph.model(x)).abs().max() > 1e-3
    # kept records: original index space, consistent with the plan
    g = next(g for g in graph.groups if g.root == "layer1.0.conv1")
    assert pruned.kept["layer1.0.conv1"]["out"] == plan[g.id].tolist()
    assert pruned.kept["layer1.0.conv2"]["in"] == plan[g.id].tolist()
    assert pruned.model.get_submodule("layer1.0.conv1").out_channels == len(plan[g.id])
    # the original is untouched
    assert graph.model.get_submodule("layer1.0.conv1").out_channels == 16


@pytest.mark.parametrize("root", ["0", "3"])
def test_shared_copy_prunes_alike_and_leaves_the_original_intact(root):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),
    ))
    graph = G.build_graph(model, torch.randn(1, 3, 8, 8))
    group = next(g for g in graph.groups if g.root == root)
    plan = {group.id: torch.arange(0, group.size, 2)}
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    deep = G.apply_plan(graph, plan)
    shared = G.apply_plan(graph, plan, share_untouched=True)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(deep.model(x), shared.model(x))
        for name in shared.kept:  # what a probe's refit does: write into the touched modules (biases included)
            for t in shared.model.get_submodule(name).parameters(recurse=False):
                t.add_(1)
    after = graph.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert graph.model.get_submodule(root).out_channels == group.size
    assert shared.model.get_submodule("8").weight is graph.model.get_submodule("8").weight  # untouched: shared


@pytest.mark.parametrize("arch", ["cifar_resnet20", "resnet18", "mobilenet_v2"])
def test_shared_copy_equals_the_deep_copy_for_every_group(arch, monkeypatch):
    """The probes' fast path (direct slicing, or torch-pruning on a structural copy) prunes exactly as
    the deep path does, group by group."""
    import torchvision

    torch.manual_seed(0)
    model = load_cifar_resnet(20) if arch == "cifar_resnet20" else getattr(torchvision.models, arch)(num_classes=10)
    graph = G.build_graph(randomize_bn(model).eval(), torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    builds = []
    build_dg = graph_prune._build_dg
    monkeypatch.setattr(graph_prune, "_build_dg", lambda *a: builds.append(1) or build_dg(*a))
    prunable = [g for g in graph.groups if g.prunable]
    for group in prunable:
        plan = {group.id: torch.randperm(group.size, generator=torch.Generator().manual_seed(group.id))[
            : max(1, group.size // 3)].sort().values}
        deep = G.apply_plan(graph, plan)
        shared = G.apply_plan(graph, plan, share_untouched=True)
        assert shared.kept == deep.kept, group.root
        with torch.no_grad():
            assert torch.allclose(shared.model(x), deep.model(x), atol=1e-5), group.root
    # one build per deep copy; the shared copies of plain conv/BN/linear groups slice directly
    direct = len(prunable) - (len(builds) - len(prunable))
    assert direct >= (1 if arch == "mobilenet_v2" else len(prunable) // 2)


def test_cifar_estimate_matches_exact(cifar):
    _, graph = cifar
    for seed, ratio in [(0, 0.5), (1, 0.3), (2, 0.8)]:
        plan = G.random_plan(graph, ratio, seed=seed)
        est = G.estimate_macs(graph, {k: len(v) for k, v in plan.items()})
        exact, params = G.count_macs_params(G.apply_plan(graph, plan).model, graph.example_input)
        assert abs(est - exact) <= 0.01 * exact
        assert params > 0
    full, _ = G.count_macs_params(graph.model, graph.example_input)
    assert G.estimate_macs(graph, {}) == full == 40_551_040  # resnet20 on 32x32


def test_cifar_onnx_and_torch_export(cifar):
    _, graph = cifar
    plan = G.random_plan(graph, 0.5, seed=4)
    pruned = G.apply_plan(graph, plan).model
    x = torch.randn(3, 3, 32, 32)
    assert onnx_diff(pruned, x) <= 1e-4
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(pruned, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), pruned(x), atol=1e-5)


def test_rewritten_model_pickles_and_copies(cifar):
    import copy

    _, graph = cifar
    pruned = G.apply_plan(graph, G.random_plan(graph, 0.5, seed=5)).model
    x = torch.randn(2, 3, 32, 32)
    for model in (graph.model, pruned):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
            assert torch.equal(copy.deepcopy(loaded)(x), model(x))
        assert type(loaded).__name__ == "CifarResNet"
        assert {n for n, _ in loaded.named_modules()} == {n for n, _ in model.named_modules()}


def test_wrong_pad_mapping_is_caught():
    """Trusting torch-pruning through the channel padding (no rewrite, no op checks) must fail
    loudly: either the pruned model breaks or the soundness check shows a large difference."""
    model = randomize_bn(load_cifar_resnet(20))
    graph = G.build_graph(model, torch.randn(1, 3, 32, 32), rewrite=False, check_ops=False)
    plan = G.random_plan(graph, 0.5, seed=0)
    x = torch.randn(2, 3, 32, 32)
    try:
        pruned = G.apply_plan(graph, plan)
        diff = G.soundness_diff(graph, plan, pruned.model, x)
    except Exception:  # noqa: BLE001 - a crash is also a detection
        return
    assert diff > 1e-2


def test_pad_without_rewrite_is_excluded():
    model = load_cifar_resnet(20)
    graph = G.build_graph(model, torch.randn(1, 3, 32, 32), rewrite=False)
    reasons = " ".join(g.reason for g in graph.excluded)
    assert "ConstantPadNd" in reasons
    assert any(g.prunable for g in graph.groups)  # conv1 -> conv2 inside blocks stay prunable
    plan = G.random_plan(graph, 0.5)
    pruned = G.apply_plan(graph, plan)
    assert G.soundness_diff(graph, plan, pruned.model, torch.randn(2, 3, 32, 32)) < 1e-4


def test_resnet18_sound_onnx_export_and_kept(resnet18):
    _, graph = resnet18
    plan = G.random_plan(graph, 0.5, seed=1)
    pruned = G.apply_plan(graph, plan)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scale = float(graph.model(x).abs().max())
        assert pruned.model(x).shape == (2, 1000)
    assert G.soundness_diff(graph, plan, pruned.model, x) <= 1e-4 * scale + 1e-4
    assert onnx_diff(pruned.model, x) <= 1e-4 * scale + 1e-4
    torch.export.export(pruned.model, (x,))
    for name, rec in pruned.kept.items():
        mod = pruned.model.get_submodule(name)
        if "out" in rec:
            assert len(rec["out"]) == getattr(mod, "out_channels", getattr(mod, "num_features", None))
        if "in" in rec and isinstance(mod, nn.Conv2d):
            assert len(rec["in"]) == mod.in_channels


@pytest.mark.parametrize("fixture", ["cifar", "resnet18"])
def test_estimate_change_is_the_difference_of_estimates(fixture, request):
    _, graph = request.getfixturevalue(fixture)
    counts = {k: len(v) for k, v in G.random_plan(graph, 0.6, seed=4).items()}
    for group in (g for g in graph.groups if g.prunable):
        for new in (1, group.size // 3, group.size):
            changed = G.estimate_macs(graph, {**counts, group.id: new}) - G.estimate_macs(graph, counts)
            assert G.estimate_macs_change(graph, counts, group.id, new) == changed


def test_resnet18_estimate_is_fast_and_exact(resnet18):
    _, graph = resnet18
    gen = torch.Generator().manual_seed(0)
    counts = {g.id: int(torch.randint(1, g.size + 1, (1,), generator=gen)) for g in graph.groups if g.prunable}
    start = time.perf_counter()
    for _ in range(200):
        est = G.estimate_macs(graph, counts)
    assert (time.perf_counter() - start) / 200 < 0.005
    plan = {gid: torch.arange(k) for gid, k in counts.items()}
    exact, _ = G.count_macs_params(G.apply_plan(graph, plan).model, graph.example_input)
    assert abs(est - exact) <= 0.01 * exact


def test_ignore_globs(resnet18):
    model, _ = resnet18
    graph = G.build_graph(model, torch.randn(1, 3, 64, 64), ignore=["layer1.*", "layer4.1.conv1"])
    for g in graph.groups:
        touched = {m.module for m in g.members}
        hit = any(n.startswith("layer1.") or n == "layer4.1.conv1" for n in touched)
        if hit:
            assert not g.prunable and g.reason in ("ignored by --ignore", "model output channels")
        elif g.root != "fc":
            assert g.prunable, g.root
    assert any(g.reason == "ignored by --ignore" for g in graph.excluded)


def test_round_min_channels_leaves_narrow_groups_free(resnet18):
    """The CPU default's alignment: only groups of at least ``round_min_channels`` are rounded."""
    model, _ = resnet18
    graph = G.build_graph(model, torch.randn(1, 3, 64, 64), round_to=8, round_min_channels=128)
    sizes = {g.size for g in graph.groups}
    assert min(sizes) < 128 <= max(sizes)  # resnet18 has both kinds
    for g in graph.groups:
        assert g.multiple == (8 if g.size >= 128 else 1)
        assert g.single_allowed == (g.size >= 128)


def test_min_channels_and_round_to(resnet18):
    model, _ = resnet18
    aligned = G.build_graph(model, torch.randn(1, 3, 64, 64), round_to=8)
    assert all(g.single_allowed for g in aligned.groups)  # alignment alone: a single channel stays possible
    assert not any(g.single_allowed for g in G.build_graph(model, torch.randn(1, 3, 64, 64)).groups)
    graph = G.build_graph(model, torch.randn(1, 3, 64, 64), min_channels=100, round_to=8)
    for g in graph.groups:
        assert g.multiple == 8
        assert g.min_channels == min(100, g.size)
        assert not g.single_allowed  # the user's floor rules it out
    plan = {g.id: torch.arange(g.min_channels) for g in graph.groups if g.prunable}
    pruned = G.apply_plan(graph, plan)
    assert pruned.model.get_submodule("layer1.0.conv1").out_channels == 64  # size 64 < floor 100
    assert pruned.model.get_submodule("layer3.0.conv1").out_channels == 100


def test_bad_plans_are_rejected(resnet18):
    _, graph = resnet18
    fc = next(g for g in graph.groups if g.root == "fc")
    with pytest.raises(ValueError, match="not prunable"):
        G.apply_plan(graph, {fc.id: torch.arange(10)})
    g = next(g for g in graph.groups if g.prunable)
    with pytest.raises(ValueError):
        G.apply_plan(graph, {g.id: torch.tensor([], dtype=torch.long)})


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.gconv = nn.Conv2d(32, 48, 3, padding=1, groups=4, bias=True)
        self.bn1 = nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.proj = nn.Conv2d(48, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.gconv(x)))
        x = self.proj(F.relu(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def test_grouped_convs_keep_valid_groups():
    model = randomize_bn(GroupedNet())
    graph = G.build_graph(model, torch.randn(1, 3, 16, 16), round_to=2)
    g_in = group_of(graph, "stem")
    g_out = group_of(graph, "gconv")
    assert g_in.prunable and g_out.prunable
    assert g_in.multiple == 4 and g_out.multiple == 4  # lcm(round_to=2, groups=4)
    assert not g_in.single_allowed and not g_out.single_allowed  # every conv group must keep as many
    assert g_in.min_channels >= 4
    assert G.conv_groups(graph, g_in.id).tolist() == [i // 8 for i in range(32)]
    # an unbalanced plan (all kept channels in the first conv groups) is rebalanced
    plan = {g_in.id: torch.arange(12), g_out.id: torch.arange(0, 48, 2)}
    applied = G.normalize_plan(graph, plan)
    part = G.conv_groups(graph, g_in.id)
    counts = torch.bincount(part[applied[g_in.id]], minlength=4)
    assert counts.tolist() == [3, 3, 3, 3]
    pruned = G.apply_plan(graph, plan)
    conv = pruned.model.gconv
    assert conv.groups == 4 and conv.in_channels == 12 and conv.out_channels == 24
    assert pruned.kept["gconv"]["in"] == applied[g_in.id].tolist()
    assert pruned.plan[g_in.id].tolist() == applied[g_in.id].tolist()
    x = torch.randn(2, 3, 16, 16)
    assert G.soundness_diff(graph, plan, pruned.model, x) < 1e-5
    assert onnx_diff(pruned.model, x) < 1e-5


def test_grouped_conv_mispruning_is_caught(monkeypatch):
    """Without rebuilding grouped weights (torch-pruning's own dense slicing), soundness fails."""
    model = randomize_bn(GroupedNet())
    graph = G.build_graph(model, torch.randn(1, 3, 16, 16))
    g_in = group_of(graph, "stem")
    plan = G.random_plan(graph, 0.5, seed=2)
    assert g_in.id in plan
    monkeypatch.setattr(graph_prune, "_rebuild_grouped", lambda *a, **k: None)
    pruned = G.apply_plan(graph, plan)
    assert G.soundness_diff(graph, plan, pruned.model, torch.randn(2, 3, 16, 16)) > 1e-3


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        y = self.b(x)
        y = torch.roll(y, 1, dims=1)  # an op torch-pruning does not understand
        return self.d(self.c(y))


def test_unknown_channel_ops_are_excluded():
    graph = G.build_graph(ShuffleNet().eval(), torch.randn(1, 3, 8, 8))
    by_root = {r: group_of(graph, r) for r in "abcd"}
    assert not by_root["a"].prunable and "channel" in by_root["a"].reason
    assert not by_root["b"].prunable and "Roll" in by_root["b"].reason
    assert by_root["c"].prunable
    assert not by_root["d"].prunable  # model output
    plan = G.random_plan(graph, 0.5)
    pruned = G.apply_plan(graph, plan)
    assert G.soundness_diff(graph, plan, pruned.model, torch.randn(2, 3, 8, 8)) < 1e-5


def test_layernorm_masking_matches_pruned():
    """ConvNeXt-style channel LayerNorm: the masked reference normalizes over kept channels."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.norm = nn.LayerNorm(16)
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 16)
            self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            x = self.conv(x)
            y = self.norm(x.permute(0, 2, 3, 1))
            y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
            return self.head(x + self.gamma * y)

    torch.manual_seed(0)
    model = Block().eval()
    graph = G.build_graph(model, torch.randn(1, 3, 8, 8))
    stream = group_of(graph, "conv")
    assert stream.prunable, stream.reason
    assert {m.module for m in stream.members} >= {"conv", "norm", "fc1", "fc2", "gamma", "head"}
    plan = G.random_plan(graph, 0.5)
    pruned = G.apply_plan(graph, plan)
    assert pruned.model.gamma.shape[0] == len(plan[stream.id])
    x = torch.randn(2, 3, 8, 8)
    assert G.soundness_diff(graph, plan, pruned.model, x) < 1e-4


def test_verify_probe_keeps_sound_groups(cifar):
    model, _ = cifar
    graph = G.build_graph(model, torch.randn(1, 3, 32, 32), verify=True)
    assert [g.root for g in graph.excluded] == ["linear"]


class ShiftNet(nn.Module):
    """``conv1(x) + 1`` is channel-wise but not zero-preserving: removing those channels is not
    equivalent to zeroing them, which the soundness probe must notice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv1(x) + 1.0
        return self.conv3(F.relu(self.conv2(x)))


def test_verify_probe_excludes_unsound_groups():
    torch.manual_seed(0)
    model = ShiftNet().eval()
    x = torch.randn(1, 3, 8, 8)
    plain = G.build_graph(model, x)
    assert group_of(plain, "conv1").prunable  # the op itself is channel-wise
    plan = G.random_plan(plain, 0.5)
    pruned = G.apply_plan(plain, plan)
    assert G.soundness_diff(plain, plan, pruned.model, torch.randn(2, 3, 8, 8)) > 1e-3  # the pipeline check fails
    verified = G.build_graph(model, x, verify=True)
    assert not group_of(verified, "conv1").prunable
    assert "probe" in group_of(verified, "conv1").reason
    assert group_of(verified, "conv2").prunable


def test_kept_records_depthwise_and_parameters():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny().eval()
    graph = G.build_graph(model, torch.randn(1, 3, 32, 32))
    plan = G.random_plan(graph, 0.5)
    pruned = G.apply_plan(graph, plan)
    stem = group_of(graph, "features.0.0")
    kept = plan[stem.id].tolist()
    assert pruned.kept["features.0.0"]["out"] == kept
    assert pruned.kept["features.1.0.block.0"]["out"] == kept  # depthwise conv in the stage-1 stream
    assert pruned.kept["features.1.0.block.0"]["in"] == kept
    assert pruned.kept["features.1.0.layer_scale"]["out"] == kept  # a bare nn.Parameter member
    assert pruned.model.get_parameter("features.1.0.layer_scale").shape[0] == len(kept)
    kinds = {(m.module, m.kind) for m in stem.members}
    assert ("features.1.0.block.3", "in") in kinds and ("features.1.0.block.5", "out") in kinds


def test_channel_broadcast_is_not_trusted():
    """x * sigmoid(conv_1ch(x)) broadcasts one channel over all: torch-pruning couples them as if
    element-wise; the group must be left whole instead of pruning the 1-channel conv."""

    class SpatialAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.att = nn.Conv2d(8, 1, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.a(x)
            x = x * torch.sigmoid(self.att(x))
            return self.c(torch.relu(self.b(x)))

    graph = G.build_graph(SpatialAttention().eval(), torch.randn(1, 3, 6, 6))
    assert not group_of(graph, "a").prunable and "broadcast" in group_of(graph, "a").reason
    assert group_of(graph, "b").prunable
    plan = G.random_plan(graph, 0.5)
    pruned = G.apply_plan(graph, plan)
    assert G.soundness_diff(graph, plan, pruned.model, torch.randn(2, 3, 6, 6)) < 1e-5
