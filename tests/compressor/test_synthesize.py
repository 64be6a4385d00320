"""Calibration images synthesized from BatchNorm statistics (``compressor.synthesize``) and their use
by the pipeline when ``--calib`` is absent."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor import synthesize


def small_bn_net(classes: int = 4) -> nn.Module:
    """Two conv-BN-ReLU layers and a classifier whose BatchNorm statistics come from "training" images
    (Gaussian, with a colour cast that noise lacks)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative averages: the statistics of all the images
    data = torch.randn(512, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 0.6
    data += torch.tensor([0.8, -0.5, 0.2])[:, None, None]
    model.train()
    with torch.no_grad():
        model(data)
    return model.eval()


def batchnorm_mismatch(model: nn.Module, images: torch.Tensor) -> float:
    """Summed squared gaps between the batch's and the running per-channel mean and std, over the BatchNorms."""
    total = []

    def hook(module, inputs, _out):
        x = inputs[0]
        mean, std = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(module.eps).sqrt()
        target = module.running_var.add(module.eps).sqrt()
        total.append(float(((mean - module.running_mean) ** 2).sum() + ((std - target) ** 2).sum()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return sum(total)


def test_synthesized_images_match_the_batchnorm_statistics_and_cover_the_classes():
    model = small_bn_net(classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = synthesize.synthesize(model, (3, 12, 12), 16, classes=4, seed=0, steps=80)
    assert images.shape == (16, 3, 12, 12) and images.dtype == torch.float32 and torch.isfinite(images).all()
    noise = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert batchnorm_mismatch(model, images) < 0.1 * batchnorm_mismatch(model, noise)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert (predicted == torch.arange(16) % 4).float().mean() >= 0.75  # image i is pulled toward class i mod 4
    # the model is left as it was
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())



def test_a_feature_output_is_synthesized_from_the_batchnorm_statistics_alone(monkeypatch):
    model = small_bn_net(classes=4)
    calls = []
    monkeypatch.setattr(synthesize.F, "cross_entropy", lambda *a, **k: calls.append(1) or torch.zeros(()))
    images = synthesize.synthesize(model, (3, 12, 12), 16, classes=0, seed=0, steps=80)
    assert not calls  # no class to pull the images toward
    noise = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert batchnorm_mismatch(model, images) < 0.1 * batchnorm_mismatch(model, noise)

def test_synthesis_is_deterministic_with_the_seed_and_splits_into_equal_batches(monkeypatch):
    model = small_bn_net()
    first = synthesize.synthesize(model, (3, 8, 8), 10, classes=4, seed=3, steps=5)
    assert torch.equal(first, synthesize.synthesize(model, (3, 8, 8), 10, classes=4, seed=3, steps=5))
    assert not torch.equal(first, synthesize.synthesize(model, (3, 8, 8), 10, classes=4, seed=4, steps=5))
    sizes = []
    real = synthesize.CosineAdam

    def record(params, lr, steps):
        sizes.append(len(params[0]))
        return real(params, lr, steps)

    monkeypatch.setattr(synthesize, "CosineAdam", record)
    monkeypatch.setattr(synthesize, "_batch_size", lambda *args: 4)
    assert synthesize.synthesize(model, (3, 8, 8), 10, classes=4, seed=3, steps=2).shape[0] == 10
    assert sizes == [4, 3, 3], sizes


def test_default_count_needs_batchnorm_and_a_model_small_enough_for_the_device():
    with_bn = small_bn_net()
    assert synthesize.default_count(with_bn, 1e6, "cpu") == (synthesize.DEFAULT_IMAGES, "")
    count, why = synthesize.default_count(with_bn, 4e9, "cpu")  # a resnet50 at 224x224
    assert count == 0 and "minutes" in why
    count, why = synthesize.default_count(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 1e6, "cpu")
    assert count == 0 and "BatchNorm" in why
    untrained = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())  # e.g. torchvision without weights
    count, why = synthesize.default_count(untrained, 1e6, "cpu")
    assert count == 0 and "initial" in why


def _run(models, monkeypatch, *extra: str, model: str = "Trained"):
    """``compress`` on ``models`` (the ``bn_net_file`` fixture) without --calib; (result, output folder)."""
    from typer.testing import CliRunner

    from compressor.cli import app

    monkeypatch.setattr(synthesize, "STEPS", 20)
    out = models.parent / "out"
    result = CliRunner().invoke(app, ["compress", f"{models}:{model}", "--budget", "60%flops", "--input-shape",
                                      "3x12x12", "--no-latency", "--out", str(out), "--force", *extra])
    return result, out


def test_without_calib_the_run_synthesizes_calibration_images_and_recovers_with_them(bn_net_file, monkeypatch):
    result, out = _run(bn_net_file, monkeypatch, "--synthesize", "72")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_source"] == "synthesized" and report["calibration_images"] == 72
    assert report["calibration_augmented"] == 7 * 72  # the recovery's copies, as for few real images
    assert report["criterion"] == "reconstruction" and report["allocation"] == "sensitivity"
    assert report["recovery"] == ["lsq", "block"]
    assert report["flops"]["ratio"] <= 0.6 + 1e-9
    assert "synthesize" in report["timings_s"]


def test_no_augment_recovers_on_the_synthesized_images_alone(bn_net_file, monkeypatch):
    result, out = _run(bn_net_file, monkeypatch, "--synthesize", "24", "--no-augment")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_images"] == 24 and report["calibration_augmented"] == 0


def test_synthesize_zero_prunes_by_the_weights_alone(bn_net_file, monkeypatch):
    result, out = _run(bn_net_file, monkeypatch, "--synthesize", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_source"] == "none" and report["calibration_images"] == 0
    assert report["criterion"] == "l1" and report["recovery"] == ["datafree"]


@pytest.mark.parametrize("extra, message", [
    (("--synthesize", "-1"), "--synthesize -1 must be 0"),
    (("--synthesize", "8", "--calib", "images.pt"), "replaces --calib"),
])
def test_bad_synthesize_values_fail_with_one_line(bn_net_file, monkeypatch, extra, message):
    result, _ = _run(bn_net_file, monkeypatch, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("asked", [False, True], ids=["default", "asked-for"])
def test_a_failed_synthesis_falls_back_to_the_weights_unless_asked_for(bn_net_file, monkeypatch, asked):
    def broken(*args, **kwargs):
        raise RuntimeError("this model's forward cannot be differentiated")

    monkeypatch.setattr(synthesize, "synthesize", broken)
    result, out = _run(bn_net_file, monkeypatch, *(("--synthesize", "16") if asked else ()))
    if asked:
        assert result.exit_code == 1 and "--synthesize failed (RuntimeError" in result.output
        assert not out.exists()
    else:
        assert result.exit_code == 0, result.output
        assert json.loads((out / "report.json").read_text())["calibration_source"] == "none"
        assert "synthesis failed" in result.output


def test_synthesis_follows_the_model_dtype():
    model = small_bn_net().double()
    images = synthesize.synthesize(model, (3, 8, 8), 4, classes=4, steps=3)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 8, 8)


def test_an_untrained_model_is_not_synthesized_from_by_default(bn_net_file, monkeypatch):
    result, out = _run(bn_net_file, monkeypatch, model="Net")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["calibration_source"] == "none"
    assert "initial ones" in result.output and "--synthesize 128" in result.output
