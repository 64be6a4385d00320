"""The configuration's defaults that depend on the data at hand."""

import pytest

from compressor.config import DATA_CRITERION_MIN_IMAGES, CompressConfig
from compressor.criteria import list_criteria


def config(**kw) -> CompressConfig:
    return CompressConfig(model="torchvision:resnet18", budget="50%flops", out="out", **kw)


@pytest.mark.parametrize(("images", "expected"), [
    (0, "l1"), (32, "l1"), (DATA_CRITERION_MIN_IMAGES - 1, "l1"),
    (DATA_CRITERION_MIN_IMAGES, "reconstruction"), (1024, "reconstruction"),
])
def test_default_criterion_follows_calibration_size(images, expected):
    assert config().criterion_for(images) == expected
    assert expected in list_criteria()


@pytest.mark.parametrize("name", list_criteria())
def test_chosen_criterion_wins_over_the_default(name):
    for images in (0, 1024):
        assert config(criterion=name).criterion_for(images) == name


def test_default_allocation_needs_calibration():
    assert config().allocation_for(True) == "sensitivity"
    assert config().allocation_for(False) == "global"
    assert config(allocation="uniform").allocation_for(True) == "uniform"


def test_model_output_defaults_to_logits_and_features_refuse_class_options():
    from pathlib import Path

    from compressor.errors import UsageError

    assert config().output_kind == "logits" and config(model_output="features").output_kind == "features"
    with pytest.raises(UsageError, match="'embedding' is not one of logits, features"):
        config(model_output="embedding")
    for option, kw in (("--eval", {"eval": Path("val")}), ("--labels", {"labels": True}),
                       ("--max-accuracy-drop", {"max_accuracy_drop": 1.0})):
        with pytest.raises(UsageError, match=f"^{option} needs class outputs"):
            config(model_output="features", **kw)


@pytest.mark.parametrize(("given", "kind", "removed"), [
    (None, "flops", False), (None, "latency_ms", True), (None, "speedup", True),
    (True, "flops", True), (False, "speedup", False),
])
def test_one_channel_branches_are_removed_under_latency_budgets_by_default(given, kind, removed):
    assert config(remove_branches=given).removes_branches(kind) is removed
