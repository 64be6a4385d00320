"""The command line through typer's CliRunner: help, exit codes, and nothing left behind on failure."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from compressor.cli import app
from compressor.criteria import list_criteria
from compressor.profiles import list_profiles

runner = CliRunner()

NET_SOURCE = """
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))
"""

# the same network, branching on its features' values: no exported graph can follow it
VALUE_BRANCH_SOURCE = NET_SOURCE.replace(
    "return self.fc(self.body(x).mean((2, 3)))",
    "y = self.body(x).mean((2, 3))\n        return self.fc(y if y.sum() > 0 else -y)")


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "net.py").write_text(NET_SOURCE)
    for i in range(24):
        folder = tmp_path / "calib" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def base_args(ws, out=None):
    return [f"{ws / 'net.py'}:Net", "--budget", "50%flops", "--calib", ws / "calib", "--out", out or ws / "out",
            "--quiet", "--iters", "3", "--warmup", "1"]


def test_help_explains_budget_and_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("compress", "demo", "criteria", "profiles", "bench"):
        assert word in result.output
    result = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "multiply-accumulates" in result.output and "MODEL" in result.output


def test_compress_help_lists_registry_choices_and_defaults():
    from compressor.criteria import list_criteria
    from compressor.recovery import list_recoveries

    result = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in list_criteria() + list_recoveries():
        assert name in text, name
    # bracketed defaults survive (no markup processing swallows them)
    assert "[lsq,block with calibration images (--calib or --synthesize), else datafree]" in text
    assert "[sensitivity with calibration images, else global]" in text
    assert "[reconstruction with 64+ calibration images, else l1]" in text


def test_criteria_lists_registry():
    from compressor.criteria import list_criteria

    result = invoke("criteria")
    assert result.exit_code == 0
    for name in list_criteria():
        assert name in result.output


def _assert_failed_cleanly(result, code, out):
    assert result.exit_code == code, result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [("missing_model", 1, "does not exist"), ("corrupt_model", 1, "not a PyTorch file"),
     ("pickle_untrusted", 1, "--trust-pickle"), ("weights_mismatch", 1, "do not fit"),
     ("budget_zero", 2, "50%flops"), ("budget_150", 2, "50%flops"), ("budget_fast", 2, "not understood"),
     ("empty_calib", 1, "holds no images"), ("unreadable_calib", 1, "not an image format Pillow can decode"),
     ("gray_images", 1, "channel"), ("rejected_shape", 1, "--input-shape"), ("nan_weights", 1, "NaN"),
     ("unwritable_out", 1, "cannot write"), ("out_not_empty", 1, "--force"),
     ("value_branch", 1, "data-dependent control flow"),
     ("eval_classes", 1, "--eval has 4 class folders but the model has 2 outputs"),
     ("device_typo", 1, "unknown device profile 'jetsn'")],
)
def test_bad_input_fails_with_one_line(workspace, case, code, words):
    ws = workspace
    out = ws / "out"
    args = base_args(ws, out)
    if case == "missing_model":
        args[0] = ws / "missing.pt"
    elif case == "corrupt_model":
        (ws / "bad.pt").write_bytes(b"garbage")
        args[0] = ws / "bad.pt"
    elif case == "pickle_untrusted":
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), ws / "whole.pt")
        args[0] = ws / "whole.pt"
    elif case == "weights_mismatch":
        torch.save({"fc.weight": torch.zeros(9, 9)}, ws / "w.pt")
        args += ["--weights", ws / "w.pt"]
    elif case.startswith("budget_"):
        args[2] = {"budget_zero": "0%flops", "budget_150": "150%flops", "budget_fast": "fast"}[case]
    elif case == "empty_calib":
        (ws / "empty").mkdir()
        args[4] = ws / "empty"
    elif case == "unreadable_calib":
        (ws / "junk").mkdir()
        (ws / "junk" / "a.jpg").write_bytes(b"not a jpeg")
        args[4] = ws / "junk"
    elif case == "gray_images":
        (ws / "gray").mkdir()
        for i in range(3):
            Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(ws / "gray" / f"{i}.png")
        args[4] = ws / "gray"
        args += ["--mean", "0.5", "--std", "0.5"]
    elif case == "rejected_shape":
        args += ["--input-shape", "3x2x2", "--no-latency"]
        (ws / "net.py").write_text(NET_SOURCE.replace("self.body(x).mean((2, 3))", "self.body(x).flatten(1)"))
    elif case == "nan_weights":
        from compressor.model_io import load_model

        state = load_model(f"{ws / 'net.py'}:Net").state_dict()
        state["fc.bias"][0] = float("nan")
        torch.save(state, ws / "nan.pt")
        args += ["--weights", ws / "nan.pt"]
    elif case == "unwritable_out":
        (ws / "file").write_text("x")
        out = ws / "file" / "sub"
        args[6] = out
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "eval_classes":  # labels are folder indices: more folders than outputs cannot be right
        (ws / "net.py").write_text(NET_SOURCE.replace("nn.Linear(32, 4)", "nn.Linear(32, 2)"))
        args += ["--eval", ws / "calib"]
    elif case == "device_typo":  # found before the (here unreadable) data is read
        (ws / "junk").mkdir()
        (ws / "junk" / "a.jpg").write_bytes(b"not a jpeg")
        args[4] = ws / "junk"
        args += ["--device", "jetsn"]
    elif case == "value_branch":  # a trace would record one path; the run must not write that ONNX file
        (ws / "net.py").write_text(VALUE_BRANCH_SOURCE)
        args += ["--no-latency"]
    result = invoke(*args)
    assert words in result.output, result.output
    if case == "out_not_empty":
        assert result.exit_code == 1 and "--force" in result.output
        assert (out / "keep.txt").read_text() == "precious"
        return
    if case == "unwritable_out":
        assert result.exit_code == 1 and result.output.startswith("error:")
        return
    _assert_failed_cleanly(result, code, out)


def test_end_to_end_small_network(workspace):
    import json

    out = workspace / "out"
    eval_args = ["--eval", workspace / "calib", "--eval-before-recovery"]
    result = invoke(*base_args(workspace, out), *eval_args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "l1"  # 24 calibration images: too few for the data-driven default
    assert report["model_output"] == "logits"
    # one channel of conv2's output is 3.0% of this network's MACs (16*9 + 32*9 of 14,256 per pixel), so the
    # width search may end up to one such step below the budget, never above it
    assert 0.50 - 0.031 <= report["flops"]["ratio"] <= 0.50
    assert report["macs"]["ratio"] == pytest.approx(report["flops"]["ratio"])
    assert report["soundness"]["max_abs_diff"] < 1e-4
    assert report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    assert set(report["accuracy"]) == {"original", "before_recovery", "pruned", "backend"}
    assert report["accuracy"]["backend"] == "onnxruntime"
    # the CPU default rounds groups of 32 or more channels to multiples of 8, the narrower ones not
    assert (report["latency"]["channel_alignment"], report["latency"]["channel_alignment_min_channels"]) == (8, 32)
    assert not (out / ".work").exists()  # the original's scratch export is not an output
    assert report["export"]["pytorch"] == {"file": "model.pt2"}
    assert "- PyTorch `model.pt2` (torch.export program)" in (out / "report.md").read_text()
    program = torch.export.load(out / "model.pt2").module()
    x = torch.randn(3, 3, 16, 16)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(program(x), torch.from_numpy(onnx_out), atol=1e-4)
    record = json.loads((out / "pruning.json").read_text())
    assert any(g["prunable"] and len(g["kept"]) < g["size"] for g in record["groups"])
    # a second run into the same folder is refused without --force and replaces it with --force
    assert invoke(*base_args(workspace, out)).exit_code == 1
    assert invoke(*base_args(workspace, out), "--force").exit_code == 0


def test_a_value_branch_stops_the_run_before_the_pruning(workspace):
    (workspace / "net.py").write_text(VALUE_BRANCH_SOURCE)
    result = invoke(*[a for a in base_args(workspace) if a != "--quiet"])
    assert result.exit_code == 1 and "data-dependent control flow" in result.output
    assert "exporting the original model" in result.output and "scoring channels" not in result.output


def test_fewer_class_folders_than_outputs_is_noted(workspace):
    (workspace / "net.py").write_text(NET_SOURCE.replace("nn.Linear(32, 4)", "nn.Linear(32, 8)"))
    args = [a for a in base_args(workspace) if a != "--quiet"]
    result = invoke(*args, "--eval", workspace / "calib", "--no-latency", "--recovery", "bn")
    assert result.exit_code == 0, result.output
    assert "--eval has 4 class folders for 8 model outputs" in result.output


def test_a_model_torch_export_cannot_capture_still_gets_its_onnx_file(workspace, monkeypatch):
    import json

    def refuse(*_args, **_kwargs):
        raise RuntimeError("unsupported construct")

    monkeypatch.setattr(torch.export, "export", refuse)
    out = workspace / "out"
    result = invoke(*base_args(workspace, out), "--no-latency", "--recovery", "lsq")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["pytorch"] == {
        "file": None, "error": "torch.export cannot capture the pruned model (RuntimeError: unsupported construct)"}
    assert not (out / "model.pt2").exists() and (out / "model.onnx").exists()
    assert "- PyTorch program: not written (torch.export cannot capture" in (out / "report.md").read_text()
    assert "model.pt2" not in result.output.splitlines()[-1] and "model.onnx" in result.output.splitlines()[-1]


@pytest.mark.parametrize(("criterion", "allocation"),
                         [(name, None) for name in list_criteria()] + [("snpfi", "criterion")])
def test_every_criterion_drives_a_whole_run(workspace, criterion, allocation):
    import json

    out = workspace / "out"
    args = [*base_args(workspace, out), "--criterion", criterion, "--no-latency", "--recovery", "lsq"]
    if allocation:
        args += ["--allocation", allocation]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == criterion
    assert report["allocation"] == (allocation or "sensitivity")
    assert report["flops"]["ratio"] <= 0.50
    assert report["soundness"]["max_abs_diff"] < 1e-4 and report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    record = json.loads((out / "pruning.json").read_text())
    assert any(g["prunable"] and len(g["kept"]) < g["size"] for g in record["groups"])



def test_a_model_that_outputs_features_is_compressed_against_its_own_output(workspace):
    """A backbone without a classifier (as self-supervised networks are deployed): no classes, no labels."""
    import json

    (workspace / "net.py").write_text(NET_SOURCE.replace("return self.fc(self.body(x).mean((2, 3)))",
                                                         "return self.body(x).mean((2, 3))"))
    out = workspace / "out"
    args = [a for a in base_args(workspace, out) if a != "--quiet"]
    result = invoke(*args, "--model-output", "features", "--criterion", "taylor", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "relative squared error of the output" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.50 and report["model_output"] == "features"
    fidelity = report["recovery_steps"]["fidelity"]
    assert set(fidelity["after"]) == {"cosine", "distortion"}
    assert fidelity["after"]["distortion"] <= fidelity["before"]["distortion"]
    refused = invoke(*base_args(workspace, workspace / "out2"), "--model-output", "features", "--eval",
                     workspace / "calib")
    assert refused.exit_code == 2 and "--eval needs class outputs" in refused.output
    assert not (workspace / "out2").exists()


@pytest.mark.parametrize("criterion", ["reconstruction", "taylor", "lrp"])
def test_a_dense_backbone_that_outputs_feature_maps_is_compressed(workspace, criterion):
    """N x C x H x W outputs (a backbone under a detection or segmentation head) with --model-output features."""
    import json

    import onnxruntime as ort

    (workspace / "net.py").write_text(NET_SOURCE.replace("return self.fc(self.body(x).mean((2, 3)))",
                                                         "return self.body(x)"))
    out = workspace / "out"
    result = invoke(*base_args(workspace, out), "--model-output", "features", "--criterion", criterion,
                    "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.50 and report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 16, 16).numpy()
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 32, 16, 16)
    refused = invoke(*base_args(workspace, workspace / "out2"), "--no-latency")
    assert refused.exit_code == 1 and "--model-output features" in refused.output

@pytest.mark.parametrize("profile", [name for name in list_profiles() if name != "cpu"])
def test_every_remote_profile_drives_a_whole_run(workspace, profile):
    """``--device PROFILE``: aligned widths, a bundle for the device and an estimated latency."""
    import json

    from compressor.profiles import load_profile

    out = workspace / "out"
    result = invoke(*base_args(workspace, out), "--device", profile, "--recovery", "lsq")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    spec = load_profile(profile)
    alignment = spec.channel_alignment_int8 if spec.default_precision == "int8" else spec.channel_alignment_fp16
    assert report["flops"]["ratio"] <= 0.50
    assert all(layer["kept"] % alignment == 0 or layer["kept"] in (1, layer["size"]) for layer in report["layers"])
    assert report["latency"]["estimate"] is True and report["latency"]["device"] == spec.name
    assert report["latency"]["layers"] == 4 and 0.0 < report["latency"]["launch_share"] < 1.0
    bundle = out / f"bundle-{spec.name}"
    assert (bundle / "model.onnx").is_file() and (bundle / "build_and_benchmark.sh").is_file()
    assert f"bundle-{spec.name}/" in result.output.splitlines()[-1]


def test_latency_budget_on_cpu_is_met(workspace):
    import json

    out = workspace / "lat"
    args = base_args(workspace, out)
    args[2] = "1.3x"
    result = invoke(*args, "--iters", "20", "--input-shape", "3x48x48")
    assert result.exit_code == 0, result.output
    budget = json.loads((out / "report.json").read_text())["budget"]
    assert budget["kind"] == "speedup"
    assert budget["achieved_ms"] <= budget["target_ms"] == pytest.approx(budget["original_ms"] / 1.3)
    assert budget["achieved_flops_ratio"] < 1.0


def test_console_entry_keeps_output_and_exit_codes(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    listed = run("criteria")
    assert listed.returncode == 0 and "l1" in listed.stdout  # flushed before the fast exit
    missing = run("no-such-model.pt", "--budget", "50%flops", "--out", str(tmp_path / "out"))
    assert missing.returncode == 1 and missing.stderr.splitlines()[-1].startswith("error: model file")
    assert run("--no-such-option").returncode == 2


RESIDUAL_SOURCE = """
import torch
import torch.nn as nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))
"""


@pytest.mark.parametrize("remove", [True, False])
def test_a_branch_left_with_one_channel_is_removed(workspace, monkeypatch, remove):
    """--remove-branches replaces a one-channel residual branch by a constant: two convolutions fewer in
    model.onnx and model.pt2, FLOPs counted without them; by default they stay, and the summary says so."""
    import json

    import onnx

    from compressor import deploy

    (workspace / "net.py").write_text(RESIDUAL_SOURCE)
    search = deploy.search

    def one_channel_in_the_middle_block(config, budget, target, graph, *args, **kwargs):
        counts, candidates = search(config, budget, target, graph, *args, **kwargs)
        middle = next(g.id for g in graph.groups if g.root == "blocks.1.conv1")
        return {**counts, middle: 1}, candidates

    monkeypatch.setattr(deploy, "search", one_channel_in_the_middle_block)
    out = workspace / "out"
    option = ["--remove-branches"] if remove else []
    result = invoke(*[a for a in base_args(workspace, out) if a != "--quiet"], *option, "--eval", workspace / "calib",
                    "--recovery", "lsq")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    record = json.loads((out / "pruning.json").read_text())
    convs = sum(n.op_type == "Conv" for n in onnx.load(out / "model.onnx").graph.node)
    middle = next(layer for layer in report["layers"] if layer["root"] == "blocks.1.conv1")
    others = sum(2 for layer in report["layers"] if layer["root"].endswith(".conv1")) + 1
    if remove:
        assert "removing 1 residual branch(es) left with one channel" in result.output
        assert report["removed_branches"] == [{"root": "blocks.1.conv1",
                                               "layers": ["blocks.1.conv1", "blocks.1.bn1", "blocks.1.conv2"]}]
        assert record["removed_branches"][0]["root"] == "blocks.1.conv1"
        assert middle["kept"] == 0 and convs == others - 2
        assert "1 residual branch(es) left with one channel were removed" in (out / "report.md").read_text()
    else:
        assert report["removed_branches"] == [] and record["removed_branches"] == []
        assert report["removable_branches"] == 1 and "--remove-branches replaces them" in result.output
        assert middle["kept"] == 1 and convs == others
    assert report["export"]["onnx"]["max_abs_diff"] <= 1e-4 and report["flops"]["ratio"] <= 0.50
    program = torch.export.load(out / "model.pt2").module()
    assert sum(1 for n in program.graph.nodes if "conv2d" in str(n.target)) == convs
