"""Helpers shared by the recovery methods: calibration batches, layer lookup, conv -> BN pairs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.graph.branches import is_frozen  # noqa: F401 - the recovery methods' import point
from compressor.graph.core import run_hooked
from compressor.recovery.base import RecoveryContext

LAYER_TYPES = (nn.Conv2d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MEMORY_BUDGET = 1.5e9  # bytes of activations allowed for single-batch passes


def bf16_supported(device: str | torch.device) -> bool:
    """Whether convolutions that tolerate rounding run in bfloat16: on a CPU whose oneDNN has native
    bfloat16 (AVX512-BF16 or AMX), unless ``COMPRESS_BF16=0``. Elsewhere bfloat16 is emulated and slower.

    Used by ``block`` (its steps and the passes that carry each block's input and target along) and by
    the width allocation's probes; see ``bf16_pays`` for which convolutions.
    """
    if torch.device(device).type != "cpu" or os.environ.get("COMPRESS_BF16", "1") == "0":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_pays(module: nn.Module) -> bool:
    """Whether bfloat16 pays for ``module`` on such a CPU: a Conv2d, ungrouped, with a kernel wider than 1x1.

    Depthwise convolutions in bfloat16 made the CIFAR MobileNetV2's ``block`` stage a third slower, and
    1x1 convolutions gained nothing measurable (``compressor/recovery/blockwise.py``).
    """
    return isinstance(module, nn.Conv2d) and module.groups == 1 and max(module.kernel_size) > 1


def in_bf16(fn, *args, **kwargs) -> torch.Tensor:
    """``fn(*args, **kwargs)`` under CPU bfloat16 autocast, its output cast back to float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args, **kwargs).float()


def require_calib(ctx: RecoveryContext, method: str) -> torch.Tensor:
    """The calibration tensor, or a one-line error saying that ``method`` needs it."""
    if ctx.calib is None or len(ctx.calib) == 0:
        raise CompressorError(
            f"recovery method {method!r} needs calibration images; pass --calib or use the data-free recipe (datafree)"
        )
    return ctx.calib


def batches(calib: torch.Tensor, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    """Calibration tensor in batches on ``device``."""
    step = max(1, int(batch_size))
    for start in range(0, len(calib), step):
        yield calib[start : start + step].to(device)


def spread(images: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of ``images`` evenly spaced from first to last (all of them when there are no more).

    Image folders load class by class, so the first ``count`` would cover only the first classes.
    """
    if count >= len(images):
        return images
    return images[spread_indices(len(images), count)]


def spread_indices(total: int, count: int) -> torch.Tensor:
    """Indices of ``count`` of ``total`` items evenly spaced from first to last (all when there are no more)."""
    if count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, max(1, count)).round().long()


def held_out_mask(count: int, every: int, sources: torch.Tensor | None = None,
                  limit: int | None = None) -> torch.Tensor:
    """Mask of ``count`` images holding out every ``every``-th source image (at most ``limit``) with its copies.

    ``sources``: the index of each image's source image (``RecoveryContext.sources``); None: each image is its own.
    A fit graded on copies of its own images would look better than it is.
    """
    sources = torch.arange(count) if sources is None else sources
    return torch.isin(sources, sources.unique()[::every][:limit])


def module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def execution_order(model: nn.Module, x: torch.Tensor, types=LAYER_TYPES) -> list[str]:
    """Names of the modules of ``types`` in the order their forward first runs on ``x``."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            handles.append(module.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n)))
    run_hooked(model, x, handles)
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


def conv_bn_pairs(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Map layer name -> name of the BatchNorm that directly consumes its output (if only that BN).

    Found by tensor identity on one forward pass, so it works for plain modules and fx graphs.
    """
    # the outputs are kept alive for the pass: a freed tensor's id() can be reused by a later one
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    handles = []

    def on_layer(name):
        def hook(_m, _i, out):
            produced[id(out)] = (name, out)

        return hook

    def on_bn(name):
        def hook(_m, inputs):
            src = produced.get(id(inputs[0]))
            if src is not None and src[1] is inputs[0]:
                pairs[src[0]] = name

        return hook

    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(on_layer(name)))
        elif isinstance(module, BN_TYPES):
            handles.append(module.register_forward_pre_hook(on_bn(name)))
    run_hooked(model, x, handles)
    return pairs


def set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    """Set (creating if absent) the bias of a conv/linear layer."""
    bias = bias.to(layer.weight.dtype).to(layer.weight.device)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=layer.weight.requires_grad)
    else:
        with torch.no_grad():
            layer.bias.copy_(bias)



def leaf_output_bytes(model: nn.Module, x1: torch.Tensor) -> list[int]:
    """Bytes of each leaf module's output for the one image ``x1`` (a 1-image batch), in call order."""
    sizes: list[int] = []
    handles = []

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out[0].numel() * out.element_size())

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    run_hooked(model, x1, handles)
    return sizes


def image_cap(model: nn.Module, calib: torch.Tensor, device: str) -> int:
    """How many calibration images fit in one batch within MEMORY_BUDGET (activations only)."""
    largest = max(leaf_output_bytes(model, calib[:1].to(device)), default=0)
    per_image = max(1, largest) * 6  # a few live activations plus the gathered patches
    return max(8, min(len(calib), int(MEMORY_BUDGET // per_image)))
