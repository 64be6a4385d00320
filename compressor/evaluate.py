"""Top-1 accuracy over labelled images, run in onnxruntime when it can be, else in PyTorch.

On a CPU, onnxruntime runs these networks much faster than eager PyTorch (ResNet-56, 5,000
CIFAR images on 2 cores: 8.5 s against 13.6 s), and a ``compress`` run evaluates two or three
models. The model is exported to ONNX first (under a second; the pipeline passes the exports it
writes anyway), and a few images are compared with PyTorch before the export is trusted: the
figure is the accuracy of the exported graph. A model on a GPU, one that does not export, or one
whose export does not match is evaluated in PyTorch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.graph import device_of

BACKENDS = ("auto", "onnxruntime", "torch")
TORCH_BATCH = 64  # small batches are faster for eager PyTorch on a CPU
ORT_BATCH = 256
ORT_BATCH_ELEMENTS = 1 << 22  # at most 16 MB of float32 input a batch: large images get smaller batches
PARITY_IMAGES = 8  # images first run in both PyTorch and onnxruntime: a mismatching export is not used


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = TORCH_BATCH) -> torch.Tensor:
    """Logits of ``model`` over ``images`` in PyTorch, in batches, in eval mode, on the model's device."""
    model.eval()
    device = device_of(model)
    return torch.cat([model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def predict_onnxruntime(model: nn.Module, images: torch.Tensor, batch_size: int | None = None,
                        onnx_path: Path | None = None) -> torch.Tensor:
    """Logits of ``model`` exported to ONNX and run in onnxruntime (CPU), in batches.

    ``onnx_path``: ``model`` already exported there (with ``export.onnx.export_onnx``).
    ``batch_size`` defaults to ORT_BATCH images, fewer when they are large (ORT_BATCH_ELEMENTS).
    The first PARITY_IMAGES images are checked against PyTorch before the rest run.

    Raises:
        CompressorError: the model does not export, onnxruntime cannot run it, or the ONNX graph's
            outputs differ from the model's.
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime  # noqa: F401 - fail early, before exporting

    from export.onnx import INPUT_NAME, check_onnx, export_onnx, ort_session

    if batch_size is None:
        batch_size = max(1, min(ORT_BATCH, ORT_BATCH_ELEMENTS // max(1, images[0].numel())))
    with tempfile.TemporaryDirectory(prefix="compressor-eval-") as folder:
        path = onnx_path if onnx_path is not None else export_onnx(model, images[:1], Path(folder) / "model.onnx")
        check_onnx(path, model, images[:PARITY_IMAGES])
        session = ort_session(path)
        batches = []
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size].detach().cpu().float().contiguous().numpy()
            batches.append(torch.from_numpy(session.run(None, {INPUT_NAME: batch})[0]))
    return torch.cat(batches)


def logits(model: nn.Module, images: torch.Tensor, backend: str = "auto",
           onnx_path: Path | None = None) -> tuple[torch.Tensor, str]:
    """Logits and the backend that computed them (``"onnxruntime"`` or ``"torch"``).

    ``auto`` uses onnxruntime for a model on the CPU and falls back to PyTorch when the export
    or onnxruntime fails; ``onnxruntime`` raises instead of falling back. ``onnx_path``: the
    model's ONNX export, when one was already written.
    """
    if backend not in BACKENDS:
        raise CompressorError(f"evaluation backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" or (backend == "auto" and device_of(model).type == "cpu"):
        try:
            return predict_onnxruntime(model, images, onnx_path=onnx_path), "onnxruntime"
        except (CompressorError, ImportError):
            if backend == "onnxruntime":
                raise
    return predict(model, images), "torch"


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, backend: str = "auto",
             onnx_path: Path | None = None) -> tuple[float, str]:
    """Top-1 accuracy of ``model`` on ``images``/``labels`` and the backend that ran it (see ``logits``)."""
    if len(images) != len(labels):
        raise CompressorError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
    out, used = logits(model, images, backend, onnx_path)
    if out.dim() != 2:
        raise CompressorError(f"accuracy needs N x classes logits, the model returned shape {tuple(out.shape)}")
    return float((out.argmax(1) == labels).float().mean()), used
