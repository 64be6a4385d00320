"""Mirrored and shifted copies of few calibration images for the recovery (``compressor.augment``), the
held-out checks that hold out whole source images, and the pipeline's ``--augment`` default."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from compressor import augment
from compressor.recovery.common import held_out_mask


def make_images(n: int, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("n, expected", [(1, 8), (64, 512), (128, 1024), (256, 1024), (511, 1024), (512, 512),
                                         (1024, 1024), (2000, 2000)])
def test_sets_under_512_grow_toward_the_default_calibration_size_with_at_most_eight_images_a_source(n, expected):
    assert augment.augmented_count(n) == expected


@pytest.mark.parametrize("n, expected", [(64, 512), (256, 1024), (600, 1024), (1024, 1024), (2000, 2000)])
def test_asked_for_copies_grow_any_set_under_1024(n, expected):
    assert augment.augmented_count(n, forced=True) == expected


def test_each_copy_is_its_source_mirrored_or_not_and_shifted_by_at_most_a_quarter():
    x = make_images(5, size=16)
    out, sources = augment.expand(x, 23, seed=3)
    assert out.shape == (23, 3, 16, 16)
    assert torch.equal(out[:5], x) and sources.tolist() == [i % 5 for i in range(23)]
    pad = augment.shift_of(16, 16)
    assert pad == 4
    flipped = 0
    for copy, src in zip(out[5:], sources[5:], strict=True):
        matches = []
        for flip in (False, True):
            padded = F.pad((x[src].flip(-1) if flip else x[src])[None], (pad,) * 4, mode="reflect")[0]
            matches += [flip for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                        if torch.equal(padded[:, dy : dy + 16, dx : dx + 16], copy)]
        assert matches, "a copy is no flip and shift of its source"
        flipped += matches[0]
    assert 0 < flipped < 18  # both kinds occur


def test_expansion_is_deterministic_with_the_seed_and_its_sources_carry_the_labels():
    x, labels = make_images(6), torch.arange(6)
    a, sa = augment.expand(x, 30, seed=1)
    b, _ = augment.expand(x, 30, seed=1)
    c, _ = augment.expand(x, 30, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert labels[sa].tolist() == [i % 6 for i in range(30)]
    same, sources = augment.expand(x, 6)
    assert same is x and sources.tolist() == list(range(6))


def test_tiny_images_shift_by_one_pixel():
    out, _ = augment.expand(make_images(2, size=2), 6)
    assert out.shape == (6, 3, 2, 2) and augment.shift_of(2, 2) == 1


def test_images_one_pixel_high_are_only_mirrored():
    x = torch.randn(3, 2, 1, 9, generator=torch.Generator().manual_seed(0))
    out, sources = augment.expand(x, 12)
    assert augment.shift_of(1, 9) == 0 and out.shape == (12, 2, 1, 9)
    assert all(torch.equal(c, x[s]) or torch.equal(c, x[s].flip(-1)) for c, s in zip(out, sources, strict=True))


def test_held_out_masks_take_whole_source_images_and_match_the_plain_stride_without_sources():
    plain = held_out_mask(40, 8)
    assert torch.nonzero(plain).flatten().tolist() == [0, 8, 16, 24, 32]
    assert held_out_mask(40, 8, limit=2).sum() == 2
    sources = torch.arange(200) % 25
    mask = held_out_mask(200, 8, sources)
    held = set(sources[mask].tolist())
    assert held == {0, 8, 16, 24} and not (set(sources[~mask].tolist()) & held)


def _cli(models, *extra: str, images: int = 40):
    """``compress`` on ``models`` (the ``bn_net_file`` fixture) with ``images`` random calibration images."""
    from typer.testing import CliRunner

    from compressor.cli import app

    tmp_path = models.parent
    data = tmp_path / "calib.pt"
    torch.save(make_images(images, size=12), data)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", f"{models}:Net", "--budget", "60%flops", "--calib", str(data),
                                      "--no-latency", "--out", str(out), "--force", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), result.output


def test_a_run_with_few_calibration_images_adds_copies_unless_told_not_to(bn_net_file):
    report, output = _cli(bn_net_file)
    assert report["calibration_images"] == 40 and report["calibration_augmented"] == 280
    assert "adding 280 mirrored and shifted copies of the 40 calibration images" in output
    assert report["criterion"] == "l1"  # chosen by the images given, not the copies
    assert "augment" in report["timings_s"]
    plain, _ = _cli(bn_net_file, "--no-augment")
    assert plain["calibration_images"] == 40 and plain["calibration_augmented"] == 0
    assert "augment" not in plain["timings_s"]
    assert plain["layers"] == report["layers"]  # the criterion and the allocation see the images alone


def test_sets_of_512_or_more_get_copies_only_when_asked_for(bn_net_file):
    report, _ = _cli(bn_net_file, "--calib-size", "20", images=600)
    assert report["calibration_images"] == 20 and report["calibration_augmented"] == 140
    report, _ = _cli(bn_net_file, images=600)
    assert report["calibration_images"] == 600 and report["calibration_augmented"] == 0
    report, _ = _cli(bn_net_file, "--augment", images=600)
    assert report["calibration_images"] == 600 and report["calibration_augmented"] == 424
