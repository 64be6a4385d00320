"""The report's latency notes: a speed-up inside the spread, and unaligned CPU widths that bought none."""

from __future__ import annotations

import pytest

from compressor.report import Report, latency_spread_note, render_markdown


def _latency(original: tuple[float, float], pruned: tuple[float, float], **extra) -> dict:
    (o50, o90), (p50, p90) = original, pruned
    return {
        "backend": "onnxruntime", "device": "cpu", "batch_size": 1, "speedup": o50 / p50,
        "original_ms": {"p50": o50, "p90": o90, "p99": o90}, "pruned_ms": {"p50": p50, "p90": p90, "p99": p90},
        **extra,
    }


def _report(lat: dict) -> Report:
    block = {"original": 100.0, "pruned": 50.0, "ratio": 0.5}
    return Report({
        "model": "m", "budget": {"text": "50%flops", "kind": "flops", "target": 0.5}, "criterion": "l1",
        "recovery": ["lsq"], "flops": block, "macs": block, "params": block,
        "soundness": {"max_abs_diff": 0.0, "excluded_groups": []}, "export": {}, "latency": lat,
        "timings_s": {"total": 1.0}, "versions": {},
    })


@pytest.mark.parametrize(("original", "pruned", "noted"), [
    ((0.290, 0.347), (0.297, 0.334), True),  # the demo network: 0.97x, well inside the spread
    ((0.363, 0.380), (0.428, 0.440), False),  # slower by more than the spread: reported as measured
    ((3.03, 3.20), (2.60, 2.75), False),  # a real 1.17x speed-up
])
def test_note_only_when_the_difference_is_inside_the_spread(original, pruned, noted):
    lat = _latency(original, pruned)
    note = latency_spread_note(lat)
    assert (note is not None) == noted
    report = _report(lat)
    assert any(line.startswith("note: the latency difference") for line in report.summary_lines()) == noted
    assert ("no measurable change" in render_markdown(report.data)) == noted


def test_estimates_and_incomplete_blocks_get_no_note():
    assert latency_spread_note(_latency((1.0, 1.2), (1.0, 1.2), estimate=True)) is None
    lat = _latency((1.0, 1.2), (1.0, 1.2))
    del lat["pruned_ms"]["p90"]
    assert latency_spread_note(lat) is None


@pytest.mark.parametrize(("alignment", "original", "pruned", "backend", "noted"), [
    (1, (0.648, 0.70), (0.776, 0.80), "onnxruntime", True),  # mobilenet_v2 at 40% unaligned: 0.83x
    (1, (1.049, 1.10), (0.979, 1.02), "onnxruntime", True),  # resnet18 at 40% unaligned: 1.07x
    (8, (0.648, 0.70), (0.776, 0.80), "onnxruntime", False),  # already aligned: nothing to suggest
    ((8, 32), (0.648, 0.70), (0.776, 0.80), "onnxruntime", True),  # the CPU default: narrow groups unaligned
    ((8, 32), (0.646, 0.70), (0.288, 0.30), "onnxruntime", False),  # ... with a real speed-up
    (1, (0.646, 0.70), (0.288, 0.30), "onnxruntime", False),  # a real speed-up (2.24x)
    (1, (0.648, 0.70), (0.776, 0.80), "torch", False),  # the hint is about onnxruntime's CPU kernels
    (None, (0.648, 0.70), (0.776, 0.80), "onnxruntime", False),  # no alignment recorded (older reports)
    (1, (0.180, 0.21), (0.175, 0.20), "onnxruntime", False),  # the demo network: overhead-bound, widths moot
])
def test_alignment_hint_when_unaligned_widths_bought_no_speed_up(alignment, original, pruned, backend, noted):
    multiple, narrow = alignment if isinstance(alignment, tuple) else (alignment, 0)
    extra = {} if alignment is None else {"channel_alignment": multiple, "channel_alignment_min_channels": narrow}
    lat = {**_latency(original, pruned, **extra), "backend": backend}
    lines = [line for line in _report(lat).summary_lines() if "try --align" in line]
    assert bool(lines) == noted
    assert ("try --align" in render_markdown(_report(lat).data)) == noted
    if noted:
        assert ("groups under 32 channels kept any width" in lines[0]) == (narrow == 32)


def test_no_alignment_hint_for_estimates():
    lat = _latency((1.05, 1.10), (1.10, 1.12), channel_alignment=1, estimate=True)
    assert not any("try --align" in line for line in _report(lat).summary_lines())


@pytest.mark.parametrize(("estimate", "share", "noted"), [
    (True, 0.95, True),  # ResNet-56 on the Jetson Orin Nano at batch 1: 1.04x at 40% of the FLOPs
    (True, 0.30, False),  # the same at batch 64 is compute-bound: 1.38x, nothing to explain
    (False, 0.95, False),  # a measurement, not an estimate: the spread note covers it
])
def test_launch_bound_estimate_is_explained(estimate, share, noted):
    lat = _latency((0.616, 0.616), (0.592, 0.592), estimate=estimate, launch_share=share, layers=56,
                   device="jetson-orin-nano")
    assert any("launch-bound" in line for line in _report(lat).summary_lines()) == noted
    assert ("launch-bound" in render_markdown(_report(lat).data)) == noted


@pytest.mark.parametrize(("original", "pruned", "slower"), [
    ((0.932, 0.95), (1.453, 1.48), True),  # a CIFAR MobileNetV2 at 50% unaligned: 0.64x, far beyond the spread
    ((0.648, 0.80), (0.700, 0.85), False),  # 0.93x but inside the spread: not called slower
    ((1.049, 1.10), (0.979, 1.02), False),  # 1.07x: no speed-up to speak of, but not slower
])
def test_alignment_hint_says_first_when_the_pruned_model_was_slower(original, pruned, slower):
    lat = _latency(original, pruned, channel_alignment=1)
    lines = [line for line in _report(lat).summary_lines() if "try --align" in line]
    assert len(lines) == 1
    assert lines[0].startswith("note: the pruned model ran slower than the original") == slower
    if slower:
        assert f"({lat['speedup']:.2f}x)" in lines[0] and "0.64x" in lines[0]


@pytest.mark.parametrize(("others", "estimate", "noted"), [
    (1.9, False, True),  # another 2-thread job on a 2-core machine
    (0.1, False, False),  # a quiet machine
    (None, False, False),  # not measured (no /proc/stat)
    (1.9, True, False),  # estimates are computed, not timed
])
def test_busy_machine_note(others, estimate, noted):
    lat = _latency((3.03, 3.20), (2.60, 2.75), estimate=estimate, settings={"other_cpu_load": others, "cpus": 2})
    lines = _report(lat).summary_lines()
    assert any("CPU cores busy while latency was measured" in line for line in lines) == noted
    assert ("not reliable" in render_markdown(_report(lat).data)) == noted
    if noted:
        assert any("1.9 of 2 CPU cores" in line for line in lines)


@pytest.mark.parametrize(("text", "kind", "target", "met"), [
    ("1.5x", "speedup", 1.5, False),  # the final measurement: 2.48 -> 1.94 ms, 1.28x
    ("1.2x", "speedup", 1.2, True),
    ("2ms", "latency_ms", 2.0, True),  # pruned p50 1.94 ms
    ("1.9ms", "latency_ms", 1.9, False),
])
def test_budget_note_when_the_final_measurement_misses_a_latency_budget(text, kind, target, met):
    from compressor.budget import Budget
    from compressor.pipeline import final_budget_check

    lat = _latency((2.48, 2.60), (1.94, 2.05))
    report = _report(lat)
    budget = {"text": text, "kind": kind, "target": target}
    budget.update(final_budget_check(Budget(kind, target, text), lat))
    report.data["budget"] = budget
    assert budget["met"] is met
    assert budget["measured"] == pytest.approx(lat["speedup"] if kind == "speedup" else 1.94)
    lines = report.summary_lines()
    assert any(f"short of the budget {text}" in line for line in lines) == (not met)
    assert (f"short of the budget {text}" in render_markdown(report.data)) == (not met)
    if not met:
        assert any("1.28x" in line or "1.940 ms" in line for line in lines)


@pytest.mark.parametrize(("calibration", "line"), [
    ({}, None),
    ({"calibration_images": 0, "calibration_source": "none"}, "- Calibration: none (pruned by the weights alone)"),
    ({"calibration_images": 1024, "calibration_source": "data", "calibration_augmented": 0},
     "- Calibration: 1,024 images"),
    ({"calibration_images": 128, "calibration_source": "synthesized", "calibration_augmented": 896},
     "- Calibration: 128 synthesized images, plus 896 mirrored and shifted copies of them"),
])
def test_the_markdown_says_what_the_run_was_calibrated_on(calibration, line):
    report = _report(_latency((3.0, 3.1), (2.0, 2.1)))
    report.data.update(calibration)
    lines = render_markdown(report.data).splitlines()
    assert [x for x in lines if x.startswith("- Calibration")] == ([line] if line else [])
