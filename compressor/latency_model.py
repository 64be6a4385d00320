"""Latency for devices we cannot run on: a roofline ESTIMATE from a device profile.

For each convolution and linear layer (found with forward hooks, so fx GraphModules with
custom ops work), time = max(FLOPs / peak throughput, bytes moved / memory bandwidth) plus the
profile's per-layer ``kernel_launch_us``. Other layers (BatchNorm, activations, adds) are assumed
fused by TensorRT and cost nothing. This is an estimate, useful for ranking candidates and
for relative speedups, not a measurement; measure on the device (device bundle) for real numbers.

``measure_candidates`` is the measured counterpart for local devices: it builds each candidate
model and times it with ``export.latency.measure``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.graph.core import device_of, run_hooked

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class LayerEstimate:
    name: str
    kind: str
    flops: float
    bytes: float
    compute_ms: float
    memory_ms: float
    launch_ms: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.launch_ms

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


@dataclass
class LatencyEstimate:
    """A roofline estimate: ``total_ms`` and the per-layer breakdown (``estimate`` is always True)."""

    device: str
    precision: str
    batch_size: int
    total_ms: float
    layers: list[LayerEstimate] = field(default_factory=list)
    estimate: bool = True

    def table(self) -> list[dict]:
        return [{"layer": layer.name, "kind": layer.kind, "flops": layer.flops, "bytes": layer.bytes,
                 "ms": layer.ms, "bound": layer.bound} for layer in self.layers]


def _layer_cost(module: nn.Module, x: torch.Tensor, y: torch.Tensor, bpe: int) -> tuple[float, float] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        macs = y.numel() * (module.in_channels // module.groups) * kernel
    elif isinstance(module, nn.Linear):
        macs = y.numel() * module.in_features
    else:
        return None
    weights = sum(p.numel() for p in module.parameters(recurse=False))
    return 2.0 * macs, float((x.numel() + y.numel() + weights) * bpe)


def estimate_latency(model: nn.Module, example_input: torch.Tensor, profile, precision: str | None = None
                     ) -> LatencyEstimate:
    """Roofline estimate of ``model`` on ``profile`` at ``precision`` (default: the profile's)."""
    precision = precision or profile.default_precision
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(BYTES_PER_ELEMENT)}")
    if precision == "int8" and profile.peak_int8_tops <= 0:
        precision = "fp16"  # no INT8 on this device: TensorRT would run FP16
    bpe = BYTES_PER_ELEMENT[precision]
    peak = profile.peak_ops_per_s(precision)
    bandwidth = profile.memory_bandwidth_gbs * 1e9
    launch_ms = profile.kernel_launch_us / 1e3
    layers: list[LayerEstimate] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        cost = _layer_cost(module, inputs[0], output, bpe)
        if cost is None:
            return
        flops, nbytes = cost
        layers.append(LayerEstimate(names.get(module, type(module).__name__), type(module).__name__, flops, nbytes,
                                    flops / peak * 1e3, nbytes / bandwidth * 1e3, launch_ms))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        run_hooked(model, example_input.to(device_of(model)), handles)
    finally:
        model.train(was_training)
    total = sum(layer.ms for layer in layers)
    return LatencyEstimate(profile.name, precision, int(example_input.shape[0]), total, layers)


def estimate_latency_ms(model: nn.Module, example_input: torch.Tensor, profile, precision: str | None = None
                        ) -> float:
    """Roofline estimate in milliseconds (see ``estimate_latency`` for the per-layer breakdown)."""
    return estimate_latency(model, example_input, profile, precision).total_ms


def measure_candidates(build: Callable[[object], nn.Module], candidates: Iterable[object],
                       example_input: torch.Tensor, device: str = "cpu", backend: str = "torch",
                       warmup: int = 5, iters: int = 20, **kwargs) -> list[dict]:
    """Build each candidate (e.g. a width or a kept-ratio) with ``build`` and measure its latency.

    Returns ``[{"candidate", "p50", "p90", "p99", "mean"}]`` in the order given; other keyword
    arguments go to ``export.latency.measure`` (all candidates use identical settings).
    """
    from export.latency import measure

    rows = []
    for candidate in candidates:
        result = measure(build(candidate), example_input, device=device, backend=backend, warmup=warmup,
                         iters=iters, **kwargs)
        rows.append({"candidate": candidate, **result.percentiles()})
    return rows


__all__ = ["LatencyEstimate", "LayerEstimate", "estimate_latency", "estimate_latency_ms", "measure_candidates"]
