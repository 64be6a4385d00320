"""Models with several outputs: choosing one, the unused layers left out, and whole runs on a two-head network."""

import copy
import json

import pytest
import torch
from torch import fx, nn

from compressor.errors import CompressorError
from compressor.output_select import UnusedLayer, choose_key, describe, drop_unused_layers, select_output

from .test_cli import base_args, invoke

TWO_HEADS_SOURCE = """
import torch.nn as nn


class TwoHeads(nn.Module):
    # a segmentation-like network: a dense head on the last features and an auxiliary head on the middle ones

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 5, 1)
        self.aux = nn.Sequential(nn.Conv2d(24, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 5, 1))

    def forward(self, x):
        mid = self.middle(self.stem(x))
        out, aux = self.head(self.last(mid)), self.aux(mid)
        return (out, aux) if self.as_tuple else {"out": out, "aux": aux}


def Net():
    return TwoHeads()
"""
exec(TWO_HEADS_SOURCE)  # defines TwoHeads here too


def _randomized(model: nn.Module) -> nn.Module:
    from tests.conftest import randomize_bn

    return randomize_bn(model).eval()


def test_describe_names_the_entries():
    assert describe(torch.zeros(2, 10)) == "tensor 2x10"
    assert describe({"out": 1, "aux": 2}) == "dict with keys 'out', 'aux'"
    assert describe((1, 2)) == "tuple of 2 entries"


@pytest.mark.parametrize(("output", "key", "chosen"), [
    (torch.zeros(1), None, None),
    ({"out": torch.zeros(1)}, None, "out"),
    ({"out": torch.zeros(1), "meta": "x"}, None, "out"),
    ({"out": torch.zeros(1), "aux": torch.zeros(1)}, "aux", "aux"),
    ((torch.zeros(1), torch.zeros(1)), "1", 1),
    ([torch.zeros(1)], None, 0),
])
def test_the_key_is_the_one_given_or_the_only_tensor(output, key, chosen):
    assert choose_key(output, key) == chosen


@pytest.mark.parametrize(("output", "key", "words"), [
    ({"out": torch.zeros(1), "aux": torch.zeros(1)}, None, "--output-key out"),
    ({"out": torch.zeros(1)}, "bad", "not among the model's outputs"),
    ((torch.zeros(1), torch.zeros(1)), "2", "pass 0 to 1"),
    ((torch.zeros(1), torch.zeros(1)), "aux", "not a position"),
    ({"out": torch.zeros(1), "meta": "x"}, "meta", "not a tensor"),
    (torch.zeros(1), "out", "drop --output-key"),
])
def test_a_missing_or_wrong_key_says_what_to_pass(output, key, words):
    with pytest.raises(CompressorError, match=words):
        choose_key(output, key)


class ValueBranch(TwoHeads):  # noqa: F821 - defined by TWO_HEADS_SOURCE
    """TwoHeads with a branch on its values: fx cannot trace it."""

    def forward(self, x):
        return super().forward(x if x.sum() > 0 else -x)


OTHER_HEAD = {"out": ["aux.0", "aux.1", "aux.3"], "aux": ["last.0", "last.1", "head"]}


@pytest.mark.parametrize("traceable", [True, False])
@pytest.mark.parametrize(("as_tuple", "key", "position"), [(False, "out", "out"), (False, "aux", "aux"),
                                                           (True, 0, 0), (True, 1, 1)])
def test_the_selected_model_returns_the_entry_without_the_other_head(traceable, as_tuple, key, position):
    """The model keeps its layer names, loses the layers only the other head reads, copies, traces and exports."""
    model = _randomized((TwoHeads if traceable else ValueBranch)(as_tuple))  # noqa: F821
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)[position]
    names = dict(model.state_dict())
    selected, dropped = select_output(model, key, x)
    assert dropped == OTHER_HEAD["out" if position in ("out", 0) else "aux"]
    assert isinstance(selected, fx.GraphModule) == traceable
    state = selected.state_dict()
    assert all(torch.equal(state[k], names[k]) for k in state)
    assert {k.rsplit(".", 1)[0] for k in names} - {k.rsplit(".", 1)[0] for k in state} == set(dropped)
    with torch.no_grad():
        assert torch.equal(selected(x), expected)
        assert torch.equal(copy.deepcopy(selected)(x), expected)
        if traceable:
            assert torch.equal(fx.symbolic_trace(selected)(x), expected)
    if traceable:  # torch.export, as model.pt2 is written
        program = torch.export.export(selected, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        assert torch.allclose(program.module()(torch.cat([x, x])), torch.cat([expected, expected]), atol=1e-6)


def test_unused_layers_give_zeros_of_their_shape_whatever_their_input():
    model = _randomized(ValueBranch())
    x = torch.randn(2, 3, 8, 8)
    selected, dropped = select_output(model, "out", x)
    assert all(isinstance(selected.get_submodule(name), UnusedLayer) for name in dropped)
    assert selected.get_submodule("aux.0")(torch.randn(3, 7, 8, 8)).shape == (3, 12, 8, 8)
    assert drop_unused_layers(selected, x) == []


def test_a_two_head_network_is_compressed_against_the_chosen_output(tmp_path):
    """A whole run on a dict-output network: FLOPs under the budget, one output in the ONNX file, equal to
    the pruned model's; without --output-key the run stops with the keys to choose from."""
    import onnxruntime as ort

    workspace = tmp_path
    (workspace / "net.py").write_text(TWO_HEADS_SOURCE)
    torch.save(torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)), workspace / "calib.pt")
    args = base_args(workspace, workspace / "out")
    args[args.index("--calib") + 1] = workspace / "calib.pt"
    refused = invoke(*args, "--model-output", "features", "--no-latency")
    assert refused.exit_code == 1 and "--output-key out" in refused.output
    assert not (workspace / "out").exists()
    result = invoke(*[a for a in args if a != "--quiet"], "--model-output", "features", "--output-key", "out",
                    "--no-latency")
    assert result.exit_code == 0, result.output
    assert "feed only the other outputs" in result.output
    report = json.loads((workspace / "out" / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.50 and report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(workspace / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output"]
    x = torch.randn(2, 3, 16, 16).numpy()
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 5, 16, 16)


def test_an_empty_key_is_a_usage_error(tmp_path):
    from compressor.config import CompressConfig
    from compressor.errors import UsageError

    with pytest.raises(UsageError, match="--output-key is empty"):
        CompressConfig(model="m.pt", budget="50%flops", out=tmp_path / "out", output_key=" ")


@pytest.mark.parametrize(("spec", "key", "dropped"), [
    ("torchvision:lraspp_mobilenet_v3_large(num_classes=5)", None, False),
    ("torchvision:deeplabv3_mobilenet_v3_large(num_classes=5, aux_loss=True)", "out", True),
])
def test_torchvision_segmentation_models_are_compressed_against_out(tmp_path, spec, key, dropped):
    """torchvision's segmentation models return {"out": ...} (and "aux"): a run without data, one output."""
    import onnxruntime as ort

    out = tmp_path / "out"
    args = [spec, "--budget", "50%flops", "--input-shape", "3x64x64", "--model-output", "features", "--out", out,
            "--no-latency", *(["--output-key", key] if key else [])]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert ("compressing against 'out'" in result.output) == (key is None)
    assert ("feed only the other outputs" in result.output) == dropped
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.50 and report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == 1
    x = torch.randn(2, 3, 64, 64).numpy()
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 5, 64, 64)
