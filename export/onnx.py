"""ONNX export with a dynamic batch dimension, and a parity check in onnxruntime (CPU).

``export_onnx`` uses the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): with
torch 2.15 it is deprecated but still the fastest and exports opset 17 exactly, including fx
GraphModules with ``index_select``/``index_copy`` (the pruning graph's channel remaps). When it
fails (or is removed in a later torch) the ``torch.export``-based exporter is tried instead.

The TorchScript exporter traces one run: a forward that branches on a tensor's value (``if
x.mean() > 0``) is recorded along the branch the example took, and the file would silently compute
that branch for every input. Its tracer warns when a tensor becomes a Python boolean; such a trace
is discarded and the ``torch.export`` exporter, which refuses to guess, decides.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError

INPUT_NAME = "input"
OUTPUT_NAME = "output"


DATA_DEPENDENT_WARNING = "Converting a tensor to a Python boolean"  # the tracer's words for a value branch


class DataDependentTrace(RuntimeError):
    """The TorchScript trace went through a branch taken on a tensor's value."""


class DataDependentControlFlow(CompressorError):
    """Neither exporter can export the model: its forward branches on a tensor's value."""


@contextlib.contextmanager
def quiet_exporters():
    """Silence the exporters' warnings, progress prints and native printouts (``native_output_discarded``);
    yields the list of warnings caught."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()),
              native_output_discarded()):
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def native_output_discarded():
    """Discard what native code writes to file descriptors 1 and 2: when the TorchScript exporter fails,
    its C++ side prints the whole graph (hundreds of lines), although the fallback then succeeds."""
    try:
        fds = [sys.__stdout__.fileno(), sys.__stderr__.fileno()]
    except (AttributeError, OSError, ValueError):  # no real stdout / stderr (embedded interpreters)
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        with tempfile.TemporaryFile() as sink:
            for fd in fds:
                os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, copy in zip(fds, saved, strict=True):
                    os.dup2(copy, fd)
    finally:
        for copy in saved:
            os.close(copy)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` (eval mode, on CPU) to ``path`` with input ``input``/output ``output`` and a dynamic batch.

    Returns the path. Raises CompressorError when neither exporter can handle the model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    example = example_input.to(device)
    if example.shape[0] == 1:  # a batch of 2 keeps the tracer from specializing the batch dim to 1
        example = torch.cat([example, example], 0)
    errors = []
    try:
        with quiet_exporters() as caught, torch.no_grad():
            torch.onnx.export(
                model, (example,), str(path), opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True, dynamo=False,
            )
        if any(DATA_DEPENDENT_WARNING in str(w.message) for w in caught):
            path.unlink(missing_ok=True)
            raise DataDependentTrace(
                "the model's forward branches on a tensor's value (data-dependent control flow), which an "
                "exported graph cannot follow"
            )
    except Exception as exc:  # noqa: BLE001 - fall back to the dynamo exporter
        errors.append(f"TorchScript exporter: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        try:
            with quiet_exporters(), torch.no_grad():
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model, (example,), str(path), opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), dynamo=True,
                )
        except Exception as exc2:  # noqa: BLE001
            errors.append(f"torch.export exporter: {type(exc2).__name__}: "
                          f"{str(exc2).splitlines()[0] if str(exc2) else ''}")
            if isinstance(exc, DataDependentTrace):
                raise DataDependentControlFlow(
                    f"ONNX export failed: {exc} (torch.export: {type(exc2).__name__}); make the branch depend on "
                    "shapes or constructor arguments, or write it with torch.where or torch.cond"
                ) from exc2
            raise CompressorError(f"ONNX export to {path} failed: {'; '.join(errors)}") from exc2
    finally:
        model.train(was_training)
    if not path.exists():
        raise CompressorError(f"ONNX export wrote nothing at {path}")
    return path


def onnx_input_name(path: str | Path) -> str:
    """Name of the first graph input (not an initializer) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            return inp.name
    raise CompressorError(f"{path}: the ONNX graph has no input")


def onnx_input_shape(path: str | Path) -> tuple[int, ...]:
    """Non-batch dims ``(C, H, W)`` of the first ONNX input; CompressorError when they are symbolic."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    name = onnx_input_name(path)
    inp = next(i for i in model.graph.input if i.name == name)
    dims = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)[1:]
    if not dims or any(d <= 0 for d in dims):
        raise CompressorError(f"{path}: input {name!r} has symbolic non-batch dimensions; only the batch may vary")
    return dims


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                spinning: bool = True):
    """An onnxruntime InferenceSession (CPU by default).

    ``spinning=False`` stops the intra-op threads from busy-waiting after a run, so that two
    sessions timed in alternation do not steal each other's cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise CompressorError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc


def check_onnx(path: str | Path, model: nn.Module, inputs: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-3,
               min_top1: float = 0.99) -> dict:
    """Run ``inputs`` through ``model`` (torch, CPU, fp32) and the ONNX file (onnxruntime CPU) and compare.

    Returns ``{"max_abs_diff", "top1_agreement", "batch_size"}``. Raises CompressorError when the
    largest difference exceeds ``atol + rtol * max|torch output|`` or the top-1 agreement (for
    outputs of shape ``(N, classes)``; picks among classes tied within that tolerance count as
    agreeing) is below ``min_top1``. The reported ``top1_agreement`` is the plain argmax agreement.
    """
    session = ort_session(path, threads=2)
    name = session.get_inputs()[0].name
    was_training = model.training
    model = model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    with torch.no_grad():
        expected = model(inputs.to(device).float())
    model.train(was_training)
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    expected = expected.detach().float().cpu().numpy()
    got = session.run(None, {name: inputs.detach().float().cpu().numpy()})[0]
    if got.shape != expected.shape:
        raise CompressorError(f"ONNX check failed for {path}: output shape {tuple(got.shape)} "
                              f"!= torch output shape {tuple(expected.shape)}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    tolerance = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
    real_top1 = 1.0
    if expected.ndim == 2 and expected.shape[1] > 1:
        pick = np.argmax(got, 1)
        agree = pick == np.argmax(expected, 1)
        top1 = float(np.mean(agree))
        # a different pick among classes tied within the tolerance is not a real disagreement
        tied = np.take_along_axis(expected, pick[:, None], 1)[:, 0] >= expected.max(1) - tolerance
        real_top1 = float(np.mean(agree | tied))
    else:
        top1 = 1.0 if diff <= tolerance else float(np.mean(np.isclose(got, expected, atol=atol, rtol=rtol)))
    result = {"max_abs_diff": diff, "top1_agreement": top1, "batch_size": int(inputs.shape[0])}
    if not np.isfinite(diff) or diff > tolerance or real_top1 < min_top1:
        raise CompressorError(
            f"ONNX check failed for {path}: max |onnxruntime - torch| = {diff:.3g} (tolerance {tolerance:.3g}), "
            f"top-1 agreement {top1:.1%} on {inputs.shape[0]} inputs; the exported graph does not match the model"
        )
    return result


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "check_onnx", "export_onnx", "onnx_input_name", "onnx_input_shape",
           "ort_session"]
