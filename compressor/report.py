"""The run report: ``report.json`` for CI (stable keys) and ``report.md`` for people."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of the libraries that shaped the result."""
    import onnx
    import onnxruntime
    import torch
    import torch_pruning
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "unknown"),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def ratio_block(original: float, pruned: float) -> dict[str, float]:
    return {"original": original, "pruned": pruned, "ratio": pruned / original if original else 0.0}


def latency_spread_note(lat: dict[str, Any]) -> str | None:
    """A warning when the measured speed-up is inside the run-to-run spread of the measurement.

    The p50 difference is compared with the larger p50-to-p90 spread of the two models: a small
    network on a CPU is bound by per-layer overhead, so fewer FLOPs may not show, and a sub-1x
    figure there is noise, not a slower model. Estimates (device profiles) get no note.
    """
    o, p = lat.get("original_ms", {}), lat.get("pruned_ms", {})
    if lat.get("estimate") or not all(k in ms for ms in (o, p) for k in ("p50", "p90")):
        return None
    spread = max(o["p90"] - o["p50"], p["p90"] - p["p50"], 0.0)
    if abs(o["p50"] - p["p50"]) > spread:
        return None
    return (f"the latency difference ({abs(o['p50'] - p['p50']):.3f} ms) is within the run-to-run spread "
            f"(p50 to p90: {spread:.3f} ms): no measurable change at batch {lat['batch_size']}; small, fast models "
            "are often bound by per-layer overhead rather than FLOPs (try --batch-size, or measure on the target "
            "device)")


ALIGNMENT_NOTE_BELOW = 1.1  # speed-ups under this, with unaligned widths on a CPU, suggest --align
# Below this original latency per-layer overhead sets the time and widths hardly matter: the demo
# network (about 0.2 ms) measured 1.26x unaligned and 1.24x aligned; mobilenet_v2 (0.6 ms) 0.90x / 1.96x.
ALIGNMENT_NOTE_MIN_MS = 0.5


def alignment_note(lat: dict[str, Any]) -> str | None:
    """A hint to try ``--align`` when widths not all multiples of 8 bought no real speed-up on a CPU.

    onnxruntime's blocked CPU kernels favour channel counts in multiples of 8; with the widths the
    FLOPs budget alone picks (``--no-align``), trained resnet18 and mobilenet_v2 (CIFAR-10, 40-50%
    FLOPs) measured 0.83-1.07x at batch 1, and 1.44-2.24x with ``--align`` (README, devices
    section); a CIFAR-stem MobileNetV2 at half width, 0.64x unaligned and 1.54x aligned at 50%. The
    CPU default aligns the groups of 32 or more channels only (``channel_alignment_min_channels``),
    so a network of narrow layers can still fall short. When the pruned model was slower by more
    than the measurement's spread, the note says so first.
    """
    if lat.get("estimate") or lat.get("backend") != "onnxruntime":
        return None
    alignment, narrow = lat.get("channel_alignment"), lat.get("channel_alignment_min_channels") or 0
    if not (alignment == 1 or (alignment is not None and narrow > 0)):
        return None  # every group already aligned, or not recorded (older reports)
    if not lat.get("speedup", 0.0) < ALIGNMENT_NOTE_BELOW:
        return None
    if lat.get("original_ms", {}).get("p50", 0.0) < ALIGNMENT_NOTE_MIN_MS:
        return None
    # beyond the run-to-run spread, a sub-1x figure is a slower model, and the user should hear that first
    slower = lat["speedup"] < 1.0 and latency_spread_note(lat) is None
    first = f"the pruned model ran slower than the original ({lat['speedup']:.2f}x); " if slower else ""
    which = ("the pruned widths are not multiples of 8 (--no-align)" if alignment == 1 else
             f"groups under {narrow} channels kept any width (the CPU default rounds the wider ones only)")
    return (first + which + "; onnxruntime's CPU kernels favour multiples of 8: try --align (resnet18 and "
            "mobilenet_v2: 0.64-1.07x unaligned, 1.44-2.24x aligned, at 40-50% FLOPs)")


LAUNCH_NOTE_SHARE = 0.5  # kernel launches at least this share of an estimate: FLOPs no longer set the time


def launch_note(lat: dict[str, Any]) -> str | None:
    """For a device estimate dominated by per-layer launch overhead: why fewer FLOPs hardly helped.

    On ResNet-56 at batch 1 the Jetson Orin Nano estimate went from 0.616 to 0.593 ms at 40% of the
    FLOPs: 56 layers' launches were 95% of the estimate.
    """
    share = lat.get("launch_share")
    if not lat.get("estimate") or share is None or share < LAUNCH_NOTE_SHARE:
        return None
    return (f"kernel launches are {share:.0%} of this estimate ({lat['layers']} layers at batch {lat['batch_size']}): "
            f"on {lat['device']} the network is launch-bound, so removing FLOPs barely shortens it; a larger "
            "--batch-size shows the compute-bound case, and only fewer layers would shorten this one")


BUSY_NOTE_CORES = 0.5  # other processes' average use of the CPU while timing, in cores, that voids the figures


def busy_machine_note(lat: dict[str, Any]) -> str | None:
    """A warning when other processes used the CPU while latency was timed on it.

    Two ``compress`` runs side by side on a 2-core machine, with two threads each, ran up to five
    times slower than one alone (README); latency measured that way says little about the model.
    """
    settings = lat.get("settings") or {}
    others = settings.get("other_cpu_load")
    if lat.get("estimate") or others is None or others < BUSY_NOTE_CORES:
        return None
    cpus = settings.get("cpus")
    return (f"other processes kept {others:.1f}{f' of {cpus}' if cpus else ''} CPU cores busy while latency was "
            "measured: these latencies are not reliable; measure on an otherwise idle machine (one compress at a time)")


def budget_note(budget: dict[str, Any]) -> str | None:
    """A warning when the report's latency measurement misses the latency or speed-up budget."""
    if budget.get("met", True):
        return None
    measured = budget["measured"]
    got = f"{measured:.2f}x" if budget["kind"] == "speedup" else f"{measured:.3f} ms"
    return (f"the final latency measurement gives {got}, short of the budget {budget['text']} that the width search "
            "met: timings on this machine vary between measurements; re-run on an idle machine, raise --iters, "
            "or ask for a margin")


def latency_notes(lat: dict[str, Any], budget: dict[str, Any] | None = None) -> list[str]:
    """The notes that go with a latency block: busy machine, measurement spread, channel alignment, launch
    overhead, and a latency budget the final measurement missed."""
    notes = (busy_machine_note(lat), latency_spread_note(lat), alignment_note(lat), launch_note(lat),
             budget_note(budget or {}))
    return [note for note in notes if note]


@dataclass
class Report:
    """A dictionary with the stable keys of ``report.json`` plus rendering helpers."""

    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def write(self, folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        (folder / "report.md").write_text(render_markdown(self.data))

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal."""
        d = self.data
        lines = [
            f"FLOPs kept {d['flops']['ratio']:.1%} (budget {d['budget']['text']}), "
            f"params kept {d['params']['ratio']:.1%}, soundness max diff {d['soundness']['max_abs_diff']:.2e}"
        ]
        acc = d.get("accuracy")
        if acc:
            before = f"pruned {acc['before_recovery']:.2%}, " if "before_recovery" in acc else ""
            lines.append(
                f"top-1 accuracy: original {acc['original']:.2%}, {before}recovered {acc['pruned']:.2%} "
                f"(in {acc.get('backend', 'torch')})"
            )
        lat = d.get("latency")
        if lat:
            lines.append(
                f"latency ({lat['backend']}, {lat['device']}, batch {lat['batch_size']}): "
                f"{lat['original_ms']['p50']:.3f} ms -> {lat['pruned_ms']['p50']:.3f} ms (p50), "
                f"speed-up {lat['speedup']:.2f}x"
            )
            lines += [f"note: {note}" for note in latency_notes(lat, d["budget"])]
        if note := branches_note(d):
            lines.append(note)
        excluded = d["soundness"]["excluded_groups"]
        if excluded:
            lines.append(f"{len(excluded)} group(s) left unpruned: " + "; ".join(
                f"{e['root']} ({e['reason']})" for e in excluded[:5]) + (" ..." if len(excluded) > 5 else ""))
        lines.append(f"wall time {d['timings_s']['total']:.1f} s")
        return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def branches_note(d: dict[str, Any]) -> str | None:
    """What happened to residual branches the width search left with one channel, if any."""
    removed = d.get("removed_branches") or []
    if removed:
        return (f"{len(removed)} residual branch(es) left with one channel were removed (a constant replaces each): "
                + ", ".join(b["root"] for b in removed))
    if d.get("removable_branches"):
        return (f"{d['removable_branches']} residual branch(es) keep a single channel; --remove-branches replaces "
                "them by constants (fewer layers: faster at batch 1, may cost some accuracy)")
    return None


def calibration_line(d: dict[str, Any]) -> str | None:
    """What the run was calibrated on: images given or synthesized, and the copies added (None: not recorded)."""
    if "calibration_images" not in d:
        return None
    count = d["calibration_images"]
    if not count:
        return "- Calibration: none (pruned by the weights alone)"
    kind = "synthesized " if d.get("calibration_source") == "synthesized" else ""
    line = f"- Calibration: {count:,} {kind}images"
    if d.get("calibration_augmented"):
        line += f", plus {d['calibration_augmented']:,} mirrored and shifted copies of them"
    return line


def render_markdown(d: dict[str, Any]) -> str:
    """A human-readable report."""
    out = [f"# Compression report: `{d['model']}`", ""]
    out += [
        f"- Budget: **{d['budget']['text']}** ({d['budget']['kind']}, target {d['budget']['target']:g})",
        f"- Criterion: `{d['criterion']}`; width allocation: `{d.get('allocation', 'global')}`",
        f"- Recovery: {', '.join(d['recovery']) or 'none'}",
        *([line] if (line := calibration_line(d)) else []),
        "",
        "| quantity | original | pruned | kept |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (("flops", "FLOPs (2 x MACs)"), ("macs", "MACs"), ("params", "parameters")):
        b = d[key]
        out.append(f"| {label} | {b['original']:,.0f} | {b['pruned']:,.0f} | {b['ratio']:.1%} |")
    acc = d.get("accuracy")
    if acc:
        out += ["", "| top-1 accuracy | value |", "| --- | ---: |"]
        out += [f"| original | {acc['original']:.2%} |"]
        if "before_recovery" in acc:
            out += [f"| pruned, before recovery | {acc['before_recovery']:.2%} |"]
        out += [f"| pruned, after recovery | {acc['pruned']:.2%} |"]
        out += ["", f"Accuracy computed in {acc.get('backend', 'torch')}."]
    s = d["soundness"]
    out += ["", "## Soundness", "", f"Pruned model vs original with removed channels zeroed: max |diff| = "
            f"{s['max_abs_diff']:.3g}."]
    if note := branches_note(d):
        out += ["", f"{note}."]
    if s["excluded_groups"]:
        out += ["", "Groups left unpruned:", ""] + [f"- `{e['root']}` ({e['size']} ch): {e['reason']}"
                                                   for e in s["excluded_groups"]]
    onnx = d["export"].get("onnx")
    out += ["", "## Export", ""]
    if onnx:
        out.append(f"- ONNX `{onnx['path']}`: max |diff| vs PyTorch {onnx['max_abs_diff']:.3g}, "
                   f"top-1 agreement {onnx['top1_agreement']:.2%}")
    program = d["export"].get("pytorch")
    if program:
        out.append(f"- PyTorch `{program['file']}` (torch.export program)" if program.get("file")
                   else f"- PyTorch program: not written ({program.get('error', 'unknown error')})")
    trt = d["export"].get("tensorrt")
    out.append(f"- TensorRT: {trt if trt else 'not built (' + d['export'].get('tensorrt_reason', 'unavailable') + ')'}")
    lat = d.get("latency")
    if lat:
        out += ["", "## Latency", "", f"{lat['backend']} on {lat['device']}, batch {lat['batch_size']}"
                + (" (estimate from the device profile, not a measurement)" if lat.get("estimate") else "") + ":", "",
                "| model | p50 ms | p90 ms | p99 ms |", "| --- | ---: | ---: | ---: |"]
        for name in ("original", "pruned"):
            ms = lat[f"{name}_ms"]
            out.append(f"| {name} | {_fmt(ms['p50'])} | {_fmt(ms['p90'])} | {_fmt(ms['p99'])} |")
        out += ["", f"Speed-up: **{lat['speedup']:.2f}x**."]
        for note in latency_notes(lat, d["budget"]):
            out += ["", f"Note: {note[0].upper()}{note[1:]}."]
    for extra in d.get("latency_other", []):
        out.append(f"- also {extra['backend']} on {extra['device']}: {extra['original_ms']['p50']:.3f} -> "
                   f"{extra['pruned_ms']['p50']:.3f} ms p50 ({extra['speedup']:.2f}x)")
    plots = d.get("plots", {})
    if plots:
        out += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    widths = d.get("layers")
    if widths:
        out += ["", "## Kept channels per group", "", "| group root | kept | of |", "| --- | ---: | ---: |"]
        out += [f"| `{w['root']}` | {w['kept']} | {w['size']} |" for w in widths]
    out += ["", "## Timings (s)", ""] + [f"- {k}: {v:.2f}" for k, v in d["timings_s"].items()]
    out += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in d["versions"].items()]
    return "\n".join(out) + "\n"
