"""Residual branches left with one channel: which are removable, silencing, the recovery leaving them,
and the fold into constants (same outputs, fewer layers, in PyTorch and in the ONNX file)."""

import pytest
import torch
from conftest import load_cifar_shapes, randomize_bn
from torch import nn

import compressor.graph as graph_mod
from compressor.graph import branches
from compressor.recovery import RecoveryContext, get_recovery


class Basic(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, inner, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class Inverted(nn.Module):
    """MobileNetV2's inverted residual: expand, depthwise, project, add (no activation after the add)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Basic(8, 6)
        self.block2 = Basic(8, 6)
        self.block3 = Inverted(8, 12)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.block3(self.block2(self.block1(self.stem(x)))).mean((2, 3)))


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def _pruned(model: nn.Module, keep: dict[str, int], x: torch.Tensor):
    graph = graph_mod.build_graph(model, x[:1])
    plan = {g.id: torch.arange(keep[g.root]) for g in graph.groups if g.root in keep}
    return graph, graph_mod.apply_plan(graph, plan)


def _count(model: nn.Module, kind=nn.Conv2d) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.fixture
def inputs():
    return torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def test_branches_at_one_channel_are_found_silenced_and_folded(inputs, tmp_path):
    torch.manual_seed(0)
    graph, pruned = _pruned(randomize_bn(ResidualNet()), {"block1.conv1": 1, "block2.conv1": 2,
                                                         "block3.depthwise.0": 1}, inputs)
    found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
    # block2 keeps two channels: not a branch to remove
    assert {b.root for b in found} == {"block1.conv1", "block3.depthwise.0"}
    inverted = next(b for b in found if b.root == "block3.depthwise.0")
    # the depthwise convolution belongs to the group as a producer; the projection is its consumer
    assert inverted.consumers == ["block3.project.0"]
    assert {"block3.expand.0", "block3.depthwise.0"} <= set(inverted.producers)

    branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found, inputs))
    silenced = pruned.model(inputs)
    basic = next(b for b in found if b.root == "block1.conv1")
    conv2 = pruned.model.get_submodule(basic.consumers[0])
    assert not conv2.weight.any() and not conv2.weight.requires_grad
    # the constant is the original layer's mean output: the running mean of the BatchNorm after it
    assert torch.equal(conv2.bias.detach(), graph.model.block1.bn2.running_mean)
    assert all(branches.is_frozen(pruned.model.get_submodule(n)) for b in found for n in b.consumers + b.producers)

    folded, merges = branches.fold(pruned.model, found)
    assert merges == 2
    assert torch.allclose(folded(inputs), silenced, atol=1e-5)
    assert _count(folded) == _count(pruned.model) - 5  # block1's two convs, block3's three
    assert {n for n, _ in folded.named_buffers() if n.startswith("removed_branch")} == {"removed_branch_0",
                                                                                          "removed_branch_1"}

    import onnx
    import onnxruntime as ort

    from export.onnx import export_onnx

    path = export_onnx(folded, inputs[:1], tmp_path / "folded.onnx")
    assert sum(n.op_type == "Conv" for n in onnx.load(path).graph.node) == _count(folded)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    assert torch.allclose(torch.from_numpy(onnx_out), silenced, atol=1e-4)
    program = torch.export.export(folded, (inputs[:2],))
    assert torch.allclose(program.module()(inputs[:2]), silenced[:2], atol=1e-5)


def test_a_constant_that_would_reach_a_layer_is_not_removable(inputs):
    graph, pruned = _pruned(randomize_bn(PlainNet()), {"body.0": 1}, inputs)
    assert branches.find_removable(pruned.model, graph.groups, pruned.plan) == []


def test_without_batchnorm_the_constant_is_the_calibration_mean(inputs):
    """A branch ending in an in-place activation instead of a BatchNorm: the constant is the mean measured
    on the calibration images, and the fold's in-place evaluation leaves the model's own bias alone."""
    model = ResidualNet()
    model.block1.bn2 = nn.ReLU(inplace=True)
    graph, pruned = _pruned(randomize_bn(model), {"block1.conv1": 1}, inputs)
    found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
    assert [b.root for b in found] == ["block1.conv1"]
    branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found, inputs))
    mean = graph.model.block1.conv2(
        torch.relu(graph.model.block1.bn1(graph.model.block1.conv1(graph.model.stem(inputs))))).mean((0, 2, 3))
    assert torch.allclose(pruned.model.block1.conv2.bias, mean, atol=1e-5)
    folded, merges = branches.fold(pruned.model, found)
    assert merges == 1 and torch.allclose(folded(inputs), pruned.model(inputs), atol=1e-5)
    assert torch.allclose(pruned.model.block1.conv2.bias, mean, atol=1e-5)


@pytest.mark.parametrize("method", ["lsq", "block", "mimic", "bias", "bn", "datafree", "lsq_block"])
def test_every_recovery_method_leaves_the_silenced_layers(inputs, method):
    calib = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    graph, pruned = _pruned(randomize_bn(ResidualNet()), {"block1.conv1": 1, "block2.conv1": 3}, inputs)
    found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
    branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found, calib))
    frozen = {n: {k: v.clone() for k, v in pruned.model.get_submodule(n).state_dict().items()}
              for b in found for n in b.consumers + b.producers}
    other = pruned.model.block2.conv2.weight.detach().clone()
    ctx = RecoveryContext(original=graph.model, pruned=pruned.model, groups=graph.groups, plan=pruned.plan,
                          kept=pruned.kept, calib=calib)
    get_recovery(method).apply(ctx)
    for name, state in frozen.items():
        layer = pruned.model.get_submodule(name)
        for key, value in state.items():
            if key.startswith("running") or key == "num_batches_tracked":
                continue  # bn re-estimates statistics: the branch still gives a constant
            assert torch.equal(getattr(layer, key).detach(), value), (method, name, key)
    if method in ("lsq", "block", "mimic", "lsq_block"):
        assert not torch.equal(pruned.model.block2.conv2.weight, other)  # the rest of the network is refit
    folded, merges = branches.fold(pruned.model, found)
    assert merges == 1 and torch.allclose(folded(inputs), pruned.model(inputs), atol=1e-5)


@pytest.mark.parametrize(("name", "pattern", "expected"), [
    ("resnet18", r"layer\d\.\d\.conv1$", 8),  # every basic block, those with a downsampling shortcut too
    ("resnet50", r"layer\d\.\d\.conv1$", 16),  # bottlenecks: the constant passes conv2's BN and the 1x1 conv3
    ("mobilenet_v2", r"features\.\d+\.conv\.1\.0$", 10),  # only the inverted residuals that add their input
])
def test_torchvision_branches_fold_to_the_same_outputs(name, pattern, expected):
    import re

    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = graph_mod.build_graph(model, x[:1])
    plan = {g.id: torch.tensor([0]) for g in graph.groups if g.prunable and re.search(pattern, g.root)}
    pruned = graph_mod.apply_plan(graph, plan)
    found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
    assert len(found) == expected
    branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found, x))
    folded, merges = branches.fold(pruned.model, found)
    assert merges == expected
    reference = pruned.model(x)
    assert torch.allclose(folded(x), reference, atol=1e-4 * max(1.0, float(reference.abs().max())))
    assert _count(folded) < _count(pruned.model)



def test_a_latency_search_with_remove_branches_times_the_folded_candidates(inputs):
    """On a launch-bound target (time = number of convolutions) only removing layers helps: with
    --remove-branches the search times each candidate with its one-channel branches folded away."""
    from compressor import deploy, widths
    from compressor.errors import BudgetError

    graph = graph_mod.build_graph(randomize_bn(ResidualNet()), inputs[:1])
    scores = {g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(g.id)) for g in graph.groups}
    target_ms = _count(graph.model) - 2.0

    def launches(model):
        return float(_count(model))

    with pytest.raises(BudgetError, match="launch-bound"):
        widths.latency_widths("global", graph, scores, target_ms, launches)
    counts, candidates = widths.latency_widths("global", graph, scores, target_ms, launches,
                                               prepare=deploy._removing_branches(graph))
    chosen = next(c for c in candidates if c.get("chosen"))
    assert chosen["latency_ms"] <= target_ms
    branch_roots = {"block1.conv1", "block2.conv1", "block3.depthwise.0"}
    assert any(counts[g.id] == 1 for g in graph.groups if g.root in branch_roots)


@pytest.mark.parametrize(("name", "expected"), [
    ("cifar_vgg16", 0), ("cifar_resnet18", 8), ("cifar_preact_resnet18", 8),
    ("cifar_senet18", 0),  # a squeeze-excitation gate multiplies the branch: a constant would not stay one
    ("cifar_mobilenet_v2", 14), ("cifar_densenet", 0),  # concatenations keep every layer's channels
])
def test_each_group_alone_at_one_channel_folds_exactly_where_it_is_removable(name, expected):
    """The community CIFAR architectures of bench/cifar_shapes.py, each group pruned alone to one channel."""
    torch.manual_seed(0)
    model = randomize_bn(load_cifar_shapes().build(name, 0.25))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = graph_mod.build_graph(model, x[:1])
    removed = 0
    for group in [g for g in graph.groups if g.prunable and g.size >= 2]:
        pruned = graph_mod.apply_plan(graph, {group.id: torch.tensor([0])})
        found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
        if not found:
            continue
        branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found, x))
        reference = pruned.model(x)
        folded, merges = branches.fold(pruned.model, found)
        assert merges == 1 and _count(folded) < _count(pruned.model), group.root
        assert torch.allclose(folded(x), reference, atol=1e-4 * max(1.0, float(reference.abs().max()))), group.root
        removed += 1
    assert removed == expected


def test_a_fold_that_changes_the_outputs_is_not_kept(inputs, monkeypatch):
    graph, pruned = _pruned(randomize_bn(ResidualNet()), {"block1.conv1": 1}, inputs)
    found = branches.find_removable(pruned.model, graph.groups, pruned.plan)
    branches.silence(pruned.model, found, pruned.kept, branches.branch_means(graph.model, found))
    folded, ok = branches.fold_checked(pruned.model, found, inputs, 1e-4)
    assert ok and folded is not pruned.model
    real_fold = branches.fold

    def off_by_a_little(model, found):
        out, merges = real_fold(model, found)
        out.removed_branch_0.add_(0.1)
        return out, merges

    monkeypatch.setattr(branches, "fold", off_by_a_little)
    assert branches.fold_checked(pruned.model, found, inputs, 1e-4) == (pruned.model, False)
