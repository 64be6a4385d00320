"""End to end on the trained ResNet-56 from ../shared (skipped with a message without it)."""

import json

import pytest
from typer.testing import CliRunner

from compressor.cli import app


@pytest.mark.slow
def test_resnet56_half_flops_end_to_end(tmp_path, cifar_resnet_file, resnet56_weights, cifar_train_tar, cifar_val_tar):
    out = tmp_path / "r56"
    result = CliRunner().invoke(app, [
        f"{cifar_resnet_file}:CifarResNet", "--weights", str(resnet56_weights), "--budget", "50%flops",
        "--calib", str(cifar_train_tar), "--calib-size", "256", "--eval", str(cifar_val_tar), "--eval-size", "1000",
        "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--device", "cpu", "--out", str(out),
        "--eval-before-recovery", "--iters", "5", "--warmup", "2", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "budget", "criterion", "recovery", "flops", "macs", "params", "soundness", "export",
                "latency", "timings_s", "versions", "accuracy"):
        assert key in report
    assert report["criterion"] == "reconstruction"  # the default with 64+ calibration images
    assert report["flops"]["ratio"] <= 0.50
    assert report["flops"]["ratio"] >= 0.49
    assert report["soundness"]["max_abs_diff"] < 1e-3
    assert report["export"]["onnx"]["max_abs_diff"] <= 1e-4
    assert report["export"]["onnx"]["top1_agreement"] == 1.0
    acc = report["accuracy"]
    assert set(acc) == {"original", "before_recovery", "pruned", "backend"}
    assert acc["original"] > 0.8
    assert acc["pruned"] >= acc["before_recovery"]
    for name in ("model.onnx", "model.pt2", "pruning.json", "report.md"):
        assert (out / name).is_file()
    assert report["latency"]["original_ms"]["p50"] > 0
    # the padded shortcuts are mapped, not excluded: every stage's residual channels can be pruned
    assert not any("pad" in (g["reason"] or "") for g in report["soundness"]["excluded_groups"])
