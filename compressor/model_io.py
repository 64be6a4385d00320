"""Loading the user's model safely: torchvision names, Python files, pickled modules."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressorError


def load_model(spec: str, weights: Path | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build the model named by ``spec`` in eval mode, float32, on the CPU.

    Args:
        spec: ``torchvision:NAME`` (random init unless ``weights``), ``path/file.py:CALLABLE``
            (a class or factory), or ``model.pt`` (a whole pickled ``nn.Module`` /
            ``torch.fx.GraphModule``, only with ``trust_pickle``). NAME and CALLABLE take
            literal arguments, e.g. ``cifar_resnet.py:CifarResNet(depth=20)`` or
            ``torchvision:resnet18(num_classes=10)``; without them they are called with none.
        weights: Optional state_dict file, loaded with ``weights_only=True``.
        trust_pickle: Allow unpickling a whole model (runs code from the file).

    Raises:
        CompressorError: one line saying what is wrong and what to do.
    """
    python_file = _PYTHON_FILE.match(spec)
    if spec.startswith("torchvision:"):
        model = _from_torchvision(*parse_call(spec.split(":", 1)[1], spec))
    elif python_file:
        model = _from_python_file(Path(python_file["path"]), *parse_call(python_file["call"], spec))
    elif spec.endswith(".py"):
        raise CompressorError(f"model {spec!r} names a Python file but no callable; write it as {spec}:ClassName")
    else:
        model = _from_pickle(Path(spec), trust_pickle)
    if weights is not None:
        load_weights(model, Path(weights))
    model = model.float().eval()
    check_finite(model)
    return model


_PYTHON_FILE = re.compile(r"^(?P<path>.*?\.py):(?P<call>.+)$", re.DOTALL)


def parse_call(text: str, spec: str) -> tuple[str, tuple, dict]:
    """``NAME`` or ``NAME(literal, key=literal, ...)`` -> (name, args, kwargs).

    Arguments are read with ``ast.literal_eval`` (numbers, strings, booleans, None, tuples, lists,
    dicts): nothing in them is executed.

    Raises:
        CompressorError: ``text`` is not a name, optionally called with literal arguments.
    """
    hint = "write NAME or NAME(key=value, ...) with literal values, e.g. CifarResNet(depth=20)"
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise CompressorError(f"model {spec!r}: cannot read {text!r}; {hint}") from None
    if isinstance(tree, ast.Name):
        return tree.id, (), {}
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise CompressorError(f"model {spec!r}: {text!r} is not a name or a call of one; {hint}")
    try:
        args = tuple(ast.literal_eval(a) for a in tree.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords if k.arg is not None}
    except ValueError:
        raise CompressorError(f"model {spec!r}: its arguments must be Python literals; {hint}") from None
    if len(kwargs) != len(tree.keywords):
        raise CompressorError(f"model {spec!r}: ** arguments are not supported; {hint}")
    return tree.func.id, args, kwargs


def _describe_call(name: str, args: tuple, kwargs: dict) -> str:
    return f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"


def _from_torchvision(name: str, args: tuple = (), kwargs: dict | None = None) -> nn.Module:
    import torchvision.models as tvm

    segmentation = tvm.list_models(module=tvm.segmentation)  # dict outputs: see --output-key
    if name not in tvm.list_models(module=tvm) and name not in segmentation:
        raise CompressorError(f"unknown torchvision model {name!r}; choose a classification or segmentation model "
                              "of torchvision.models.list_models()")
    options = {"weights": None}
    if name in segmentation:
        options["weights_backbone"] = None  # nothing is downloaded: random weights unless --weights
    if name in ("googlenet", "inception_v3"):
        options.update(aux_logits=False, init_weights=True)
    options.update(kwargs or {})
    try:
        return tvm.get_model(name, *args, **options)
    except Exception as exc:
        raise CompressorError(
            f"building torchvision {_describe_call(name, args, kwargs or {})} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the arguments against torchvision's docs"
        ) from exc


def _from_python_file(path: Path, name: str, args: tuple = (), kwargs: dict | None = None) -> nn.Module:
    if not path.is_file():
        raise CompressorError(f"model file {str(path)!r} does not exist; check the path before ':'")
    module_name = f"_compressor_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CompressorError(f"importing {str(path)!r} failed ({type(exc).__name__}: {exc}); fix the file") from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CompressorError(f"{str(path)!r} has no callable {name!r}; name a class or function defined there")
    call = _describe_call(name, args, kwargs or {})
    try:
        model = factory(*args, **(kwargs or {}))
    except Exception as exc:
        raise CompressorError(
            f"calling {call} from {str(path)!r} failed ({type(exc).__name__}: {exc}); "
            "pass the arguments it needs as literals, e.g. file.py:Net(depth=20)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise CompressorError(f"{call} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_pickle(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.is_file():
        raise CompressorError(
            f"model file {str(path)!r} does not exist; pass a .pt file, torchvision:NAME or file.py:CALLABLE"
        )
    if path.suffix.lower() == ".onnx":
        raise CompressorError(
            f"{str(path)!r} is an ONNX file, which is not pruned here; pass the PyTorch model it was exported from "
            "(torchvision:NAME, file.py:CALLABLE or a .pt); `compress bench` times ONNX files"
        )
    if _is_exported_program(path):
        raise CompressorError(
            f"{str(path)!r} is a torch.export program: its layers are no longer modules, so its channels cannot be "
            "removed; pass the PyTorch model it came from (to prune further, a smaller --budget on the original)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _looks_like_torch_file(path):
            raise CompressorError(f"{str(path)!r} is not a PyTorch file (corrupt or wrong format)") from exc
        if not trust_pickle:
            raise CompressorError(
                f"{str(path)!r} is a pickled model and unpickling runs code from it; "
                "pass --trust-pickle if you trust its source"
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CompressorError(f"cannot unpickle {str(path)!r} ({type(exc2).__name__}: {exc2})") from exc2
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise CompressorError(
            f"{str(path)!r} holds weights (a state_dict), not a model; pass the architecture as MODEL "
            "(torchvision:NAME or file.py:CALLABLE) and this file as --weights"
        )
    raise CompressorError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")


def _is_exported_program(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (e.g. ``model.pt2`` written by ``compress``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/archive_format") or name == "archive_format" for name in archive.namelist())


def _looks_like_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as fh:
        return fh.read(2) == b"\x80\x02"  # legacy pickle protocol 2 header


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict into ``model`` (``weights_only=True``), casting dtypes to the model's."""
    if not path.is_file():
        raise CompressorError(f"weights file {str(path)!r} does not exist; check --weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompressorError(
            f"cannot read weights from {str(path)!r} as a state_dict ({type(exc).__name__}); "
            "--weights takes a state_dict saved with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressorError(f"{str(path)!r} is not a state_dict of tensors; pass the model's state_dict file")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # older checkpoints omit BatchNorm's step counter; it does not affect inference
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CompressorError(
            f"weights {str(path)!r} do not fit the model: {', '.join(parts)}; pass the matching architecture "
            "(a factory's arguments go in MODEL, e.g. file.py:Net(depth=20))"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def check_finite(model: nn.Module) -> None:
    """Refuse models with NaN or infinite parameters or buffers."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressorError(f"the model's {name!r} contains NaN or infinite values; fix the checkpoint")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first_conv_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution, used to validate image channel counts."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


__all__ = ["load_model", "load_weights", "check_finite", "count_params", "first_conv_in_channels"]
