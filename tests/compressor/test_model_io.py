import pytest
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.model_io import load_model

NET_SOURCE = """
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

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
