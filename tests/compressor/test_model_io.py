import pytest
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.model_io import load_model

NET_SOURCE = """
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, width=4, classes=2):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def not_a_model():
    return 42
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET_SOURCE)
    return path


def test_python_file_and_fp16_weights(net_file, tmp_path):
    model = load_model(f"{net_file}:Net")
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    loaded = load_model(f"{net_file}:Net", weights=tmp_path / "w.pt")
    assert loaded.conv.weight.dtype == torch.float32
    assert torch.allclose(loaded.conv.weight, model.conv.weight.half().float())
    assert not loaded.training


def test_torchvision_name():
    model = load_model("torchvision:resnet18")
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("call", ["Net(6, classes=3)", "Net(width=6, classes=3)", " Net( 6 , classes = 3 ) "])
def test_python_file_with_literal_arguments(net_file, tmp_path, call):
    model = load_model(f"{net_file}:{call}")
    assert (model.conv.out_channels, model.fc.out_features) == (6, 3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CompressorError, match=r"do not fit.*Net\(depth=20\)"):
        load_model(f"{net_file}:Net", weights=tmp_path / "w.pt")  # the hint says where the arguments go
    assert torch.equal(load_model(f"{net_file}:{call}", weights=tmp_path / "w.pt").fc.weight, model.fc.weight)


def test_torchvision_with_literal_arguments():
    assert load_model("torchvision:resnet18(num_classes=10)").fc.out_features == 10
    with pytest.raises(CompressorError, match=r"building torchvision resnet18\(depth=3\) failed"):
        load_model("torchvision:resnet18(depth=3)")


@pytest.mark.parametrize(
    ("call", "message"),
    [("Net(width=os.getcwd())", "must be Python literals"), ("Net(**{'width': 6})", "not supported"),
     ("Net(", "cannot read"), ("Net.attr", "not a name or a call"), ("Net(wdth=6)", r"calling Net\(wdth=6\)")],
)
def test_bad_arguments_are_refused_without_running_them(net_file, call, message):
    with pytest.raises(CompressorError, match=message):
        load_model(f"{net_file}:{call}")


def test_pickle_needs_trust(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(CompressorError, match="--trust-pickle"):
        load_model(str(tmp_path / "m.pt"))
    assert isinstance(load_model(str(tmp_path / "m.pt"), trust_pickle=True), nn.Sequential)


def test_state_dict_as_model_is_explained(tmp_path, net_file):
    torch.save(load_model(f"{net_file}:Net").state_dict(), tmp_path / "w.pt")
    with pytest.raises(CompressorError, match="--weights"):
        load_model(str(tmp_path / "w.pt"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [("missing.pt", "does not exist"), ("torchvision:nonet", "unknown torchvision"),
     ("{net}:Nope", "no callable"), ("{net}:not_a_model", "not a torch.nn.Module"), ("{net}", "no callable")],
)
def test_bad_model_specs(net_file, spec, message):
    with pytest.raises(CompressorError, match=message):
        load_model(spec.format(net=net_file))


def test_exported_artifacts_are_explained(net_file, tmp_path):
    """compress's own outputs passed back as MODEL: say why they cannot be pruned and what to pass."""
    model = load_model(f"{net_file}:Net")
    example = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "model.pt2")
    with pytest.raises(CompressorError, match="torch.export program.*pass the PyTorch model"):
        load_model(str(tmp_path / "model.pt2"), trust_pickle=True)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")
    with pytest.raises(CompressorError, match="ONNX file.*compress bench"):
        load_model(str(tmp_path / "model.onnx"))


def test_corrupt_model_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(CompressorError, match="not a PyTorch file"):
        load_model(str(tmp_path / "bad.pt"))


def test_weights_that_do_not_fit(net_file, tmp_path):
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "w.pt")
    with pytest.raises(CompressorError, match="do not fit.*missing.*wrong shape"):
        load_model(f"{net_file}:Net", weights=tmp_path / "w.pt")


def test_nan_weights_refused(net_file, tmp_path):
    model = load_model(f"{net_file}:Net")
    state = model.state_dict()
    state["fc.bias"][0] = float("nan")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CompressorError, match="NaN"):
        load_model(f"{net_file}:Net", weights=tmp_path / "w.pt")
