"""``compress demo``: the trained VGG-style digits network keeps its accuracy through pruning and recovery.

This is the second trained network (besides the CIFAR ResNets of ../shared) that the default
allocation and recovery recipe are checked on, end to end through the CLI. Training runs once
per session (about 30 s on two cores).
"""

import json

import pytest
from typer.testing import CliRunner

from compressor.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.mark.parametrize(("budget", "max_drop"), [("50%flops", 1.5), ("40%flops", 3.0)])
def test_demo_keeps_accuracy_without_retraining(cache, tmp_path, budget, max_drop):
    out = tmp_path / "run"
    result = runner.invoke(app, ["demo", "--out", str(out), "--cache", str(cache), "--budget", budget])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert report["flops"]["ratio"] <= float(budget.split("%")[0]) / 100 + 1e-9
    assert 100 * (acc["original"] - acc["pruned"]) <= max_drop, acc
