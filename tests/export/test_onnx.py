"""ONNX export with a dynamic batch and the onnxruntime parity check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CompressorError
from export.onnx import check_onnx, export_onnx, onnx_input_name, onnx_input_shape


class SmallNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class IndexOps(nn.Module):
    """Channel remaps like the pruning graph's: index_select over a zero-padded input, index_copy of a mask."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("gather", torch.tensor([0, 6, 2, 3, 6, 5, 1, 4]))
        self.register_buffer("idx", torch.tensor([1, 4]))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x)
        padded = torch.cat([y, torch.zeros_like(y[:, :1])], dim=1).index_select(1, self.gather)
        mask = torch.ones(8, device=x.device).index_copy(0, self.idx, torch.zeros(2, device=x.device))
        return self.fc((padded * mask.view(1, -1, 1, 1)).mean((2, 3)))


class Negated(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return -self.model(x)


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and classifier weights, so logits are far from ties."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.6)
            m.bias.data.uniform_(-0.2, 0.2)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    return model.eval()


def _roundtrip(model, tmp_path, shape=(3, 32, 32)):
    torch.manual_seed(0)
    model = _randomize(model)
    with torch.no_grad():
        logits = model(torch.randn(4, *shape))
    assert logits.std() > 1e-2  # a meaningful comparison, not near-zero outputs
    scale = max(1.0, float(logits.abs().max()))
    path = export_onnx(model, torch.randn(1, *shape), tmp_path / "m.onnx")
    assert path.exists() and onnx_input_name(path) == "input"
    assert onnx_input_shape(path) == shape
    for batch in (1, 3):
        result = check_onnx(path, model, torch.randn(batch, *shape))
        assert result["max_abs_diff"] < 1e-3 * scale
        assert result["top1_agreement"] == 1.0
        assert result["batch_size"] == batch
    return path


def test_small_convnet_dynamic_batch(tmp_path):
    _roundtrip(SmallNet(), tmp_path)


def test_fx_graphmodule_with_index_ops(tmp_path):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(IndexOps())
    assert any(n.target in ("index_select", "index_copy") for n in gm.graph.nodes)
    _roundtrip(gm, tmp_path, shape=(3, 16, 16))


def test_mobilenet_v2_random_weights(tmp_path):
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    _roundtrip(mobilenet_v2(weights=None, num_classes=10), tmp_path, shape=(3, 64, 64))


def test_wrong_model_is_caught(tmp_path):
    torch.manual_seed(0)
    model = _randomize(SmallNet())
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    with pytest.raises(CompressorError, match="ONNX check failed"):
        check_onnx(path, Negated(model), torch.randn(4, 3, 32, 32))
    with pytest.raises(CompressorError, match="output shape"):
        check_onnx(path, SmallNet(classes=7).eval(), torch.randn(2, 3, 32, 32))


def test_model_state_is_preserved(tmp_path):
    model = SmallNet().train()
    export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert model.training


class UpsamplingAdaptivePool(nn.Module):
    """VGG's head at a small input: adaptive average pooling from 2x2 up to 7x7, which the TorchScript
    exporter refuses (the ``torch.export`` exporter takes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 7), 1))


def test_the_fallback_exporter_runs_without_the_first_ones_graph_dump(tmp_path, capfd):
    _roundtrip(UpsamplingAdaptivePool(), tmp_path, shape=(3, 2, 2))
    captured = capfd.readouterr()
    assert "graph" not in (captured.out + captured.err).lower(), (captured.out + captured.err)[:500]


class ValueBranch(nn.Module):
    """Takes one of two paths depending on its input's values: a trace records only one of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = y * 2
        return y.mean((2, 3))


class ShapeBranch(ValueBranch):
    """Branches on a shape only: every exporter follows it, no warning to act on."""

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 8:
            y = y * 2
        return y.mean((2, 3))


def test_a_branch_on_tensor_values_is_refused_not_traced_one_way(tmp_path):
    with pytest.raises(CompressorError, match="branches on a tensor's value.*torch.where"):
        export_onnx(ValueBranch().eval(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_branch_on_shapes_exports(tmp_path):
    model = ShapeBranch().eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert check_onnx(path, model, torch.randn(4, 3, 16, 16))["max_abs_diff"] < 1e-5
