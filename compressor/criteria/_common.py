"""Helpers shared by the criteria: member lookup, filter weights, activation taps, calibration batches.

Not a criterion (it registers nothing). The pieces:

* :func:`require_calib` -- the one-line error every data-driven criterion raises without data.
* :func:`working_copy` -- a frozen deep copy of ``ctx.model`` on ``ctx.device`` to run passes on,
  so the caller's model never gets hooks, ``.grad`` or mode changes.
* :func:`filter_rows` -- a producer member's weight as a ``size x fan_in`` matrix (group order).
* :class:`Taps` -- forward hooks on the groups' producer modules that record every call's output
  (and can mask or gate channels in group space, differentiably).
* :func:`finalize` -- turns accumulated raw scores into the finite, non-negative float32 CPU
  tensors the interface promises.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from compressor.criteria.base import ScoringContext
from compressor.errors import CompressorError
from compressor.graph import lookup
from compressor.groups import ChannelGroup, GroupMember, Scores

FILTER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORM_TYPES = BN_TYPES + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


# ------------------------------------------------------------------------------------ lookups


def require_calib(ctx: ScoringContext, name: str) -> torch.Tensor:
    """``ctx.calib``, or the one-line error that says the criterion needs calibration data."""
    if ctx.calib is None or len(ctx.calib) == 0:
        raise CompressorError(
            f"criterion {name} needs calibration data; pass --calib with a folder or archive of images "
            "(or choose a data-free criterion such as l1)"
        )
    return ctx.calib


def index_tensor(member: GroupMember, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(member.indices, dtype=torch.long, device=device)


def filter_rows(model: nn.Module, member: GroupMember) -> torch.Tensor | None:
    """Weights producing the member's output channels as ``size x fan_in`` (float32, CPU, detached).

    Convolutions and linears give their filters, transposed convolutions their output slices,
    norms and bare parameters their per-channel scale (``size x 1``). None for a member that has
    no weight (norm without affine, unknown module).
    """
    obj = lookup(model, member.module)
    idx = index_tensor(member)
    if isinstance(obj, nn.Parameter):
        w = obj.detach()
    elif isinstance(obj, TRANSPOSED_TYPES):
        w = obj.weight.detach().transpose(0, 1)
    elif isinstance(obj, nn.Module) and isinstance(getattr(obj, "weight", None), torch.Tensor):
        w = obj.weight.detach()
    else:
        return None
    if w.dim() == 0 or w.shape[0] <= int(idx.max()):
        return None
    return w.index_select(0, idx.to(w.device)).reshape(len(idx), -1).float().cpu()


def is_filter_layer(model: nn.Module, member: GroupMember) -> bool:
    obj = lookup(model, member.module)
    return isinstance(obj, FILTER_TYPES + TRANSPOSED_TYPES)


def is_bn(model: nn.Module, member: GroupMember) -> bool:
    obj = lookup(model, member.module)
    return isinstance(obj, BN_TYPES) and obj.weight is not None


def channel_dim(module: nn.Module) -> int:
    """Dimension of ``module``'s output that holds channels: last for linears and LayerNorm, else 1."""
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def tap_members(model: nn.Module, group: ChannelGroup) -> list[GroupMember]:
    """The producer modules whose outputs carry the group's activation.

    Post-norm outputs are preferred (BatchNorm/LayerNorm members, i.e. the activation after
    normalization); without norms, the conv/linear outputs; bare parameters are never tapped.
    Several members (coupled residual groups) are all returned; criteria combine their statistics.
    """
    out = [m for m in group.producers() if isinstance(lookup(model, m.module), nn.Module)]
    norms = [m for m in out if isinstance(lookup(model, m.module), NORM_TYPES)]
    if norms:
        return norms
    filters = [m for m in out if isinstance(lookup(model, m.module), FILTER_TYPES + TRANSPOSED_TYPES)]
    return filters or out


# ------------------------------------------------------------------------------- passes


def working_copy(ctx: ScoringContext) -> nn.Module:
    """A deep copy of the model in eval mode on ``ctx.device`` with every parameter frozen."""
    model = copy.deepcopy(ctx.model).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batches(ctx: ScoringContext, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels or None) in batches on ``ctx.device``."""
    calib = ctx.calib
    step = max(1, int(batch_size or ctx.batch_size))
    for start in range(0, len(calib), step):
        x = calib[start : start + step].to(ctx.device).float().clone()
        y = ctx.labels[start : start + step].to(ctx.device).long() if ctx.labels is not None else None
        yield x, y


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a model output (tensor, tuple/list whose first item, or dict 'logits')."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        for v in output.values():
            if isinstance(v, torch.Tensor):
                return v
    raise CompressorError("the model's output is not a tensor of logits; criteria that need data cannot score it")


def targets(logits: torch.Tensor, labels: torch.Tensor | None, output: str = "logits") -> torch.Tensor:
    """What a criterion explains, per image: a class index, or for ``output="features"`` an output vector.

    Class outputs: the true labels when given, else the model's own prediction (label-free scoring).
    Feature outputs (an embedding, no classes): the model's own output vector (detached, N x D), read on
    the unpruned model; :func:`target_score` then projects an output on its direction.
    """
    if output == "features":
        return logits.detach().flatten(1).float()
    if labels is not None:
        return labels
    return logits.detach().flatten(1).argmax(1)


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image evidence for ``target``: the target class's logit, or for a feature target (N x D) the
    output's component along that vector's direction (the analogue of a class logit: the class-score
    vector's component along the target class's axis)."""
    if target.dim() == 2:
        return (logits.flatten(1).float() * F.normalize(target, dim=1)).sum(1)
    return logits.gather(1, target[:, None]).squeeze(1)


def target_log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image log-probability of the target class, or for a feature target :func:`target_score`."""
    if target.dim() == 2:
        return target_score(logits, target)
    return F.log_softmax(logits.flatten(1).float(), 1).gather(1, target[:, None]).squeeze(1)


def output_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against a class target, or for a feature target (N x D) the mean over images of the
    squared error relative to the target's energy, ``||f - t||^2 / ||t||^2``."""
    if target.dim() == 2:
        return ((logits.flatten(1).float() - target).pow(2).sum(1) / target.pow(2).sum(1).clamp_min(1e-12)).mean()
    return F.cross_entropy(logits, target)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's global RNG seeded, restoring its previous state afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def per_channel(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t`` as ``N x size x rest`` in group channel order (channel dimension ``dim``)."""
    t = t.movedim(dim, 1) if dim != 1 else t
    if t.dim() == 1:
        t = t.unsqueeze(0)
    t = t.index_select(1, idx)
    return t.reshape(t.shape[0], t.shape[1], -1)


class Taps:
    """Forward hooks on the tap modules of ``groups`` that record each call's output.

    ``records`` holds ``(module name, output)`` for every call in order (modules called more
    than once give several records). ``entries[name]`` lists ``(group id, index tensor, channel
    dim)`` so a record can be read in each group's channel space.

    Args:
        model: The working copy to hook.
        groups: Groups to tap (usually the prunable ones).
        keep_graph: Record outputs with their autograd graph and hand a clone downstream (so
            in-place ops after the tap, e.g. ``ReLU(inplace=True)``, do not alter the record);
            needed when gradients w.r.t. the records are taken. Otherwise records are detached.
        transform: Optional ``fn(name, module, inputs, output) -> output`` applied before
            recording (LRP's modified-gradient layers).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        *,
        keep_graph: bool = False,
        transform: Callable | None = None,
    ) -> None:
        self.model = model
        self.keep_graph = keep_graph
        self.transform = transform
        self.entries: dict[str, list[tuple[int, torch.Tensor, int]]] = {}
        self.tapped_groups: set[int] = set()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for g in groups:
            for m in tap_members(model, g):
                module = model.get_submodule(m.module)
                self.entries.setdefault(m.module, []).append((g.id, index_tensor(m, device), channel_dim(module)))
                self.tapped_groups.add(g.id)
        self.masks: dict[int, torch.Tensor] = {}  # group id -> multiplier, [size] or [N, size]
        self.records: list[tuple[str, torch.Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> Taps:
        for name in self.entries:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def clear(self) -> None:
        self.records.clear()

    def _apply_masks(self, name: str, out: torch.Tensor) -> torch.Tensor:
        for gid, idx, dim in self.entries[name]:
            mask = self.masks.get(gid)
            if mask is None:
                continue
            d = dim % out.dim()
            full_shape = (out.shape[0], out.shape[d]) if mask.dim() == 2 else (out.shape[d],)
            mult = torch.ones(full_shape, dtype=out.dtype, device=out.device)
            mult = mult.index_copy(mult.dim() - 1, idx, mask.to(out.dtype))
            view = [1] * out.dim()
            view[d] = out.shape[d]
            if mask.dim() == 2:
                view[0] = out.shape[0]
            out = out * mult.reshape(view)
        return out

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return None
            out = output
            if self.transform is not None:
                out = self.transform(name, module, inputs, out)
            if self.masks:
                out = self._apply_masks(name, out)
            if self.keep_graph:
                self.records.append((name, out))
                return out.clone()
            self.records.append((name, out.detach()))
            return out if out is not output else None

        return hook

    def views(self, tensors: list[torch.Tensor] | None = None) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(group id, module name, ``N x size x rest`` view) for every record and group it feeds.

        ``tensors`` (e.g. gradients w.r.t. the records, same order) replaces the recorded values.
        """
        for i, (name, rec) in enumerate(self.records):
            t = rec if tensors is None else tensors[i]
            if t is None:
                t = torch.zeros_like(rec)
            for gid, idx, dim in self.entries[name]:
                yield gid, name, per_channel(t, dim, idx)


def grads_of(outputs: torch.Tensor, records: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor | None]:
    """Gradients of the scalar ``outputs`` w.r.t. the recorded tensors (None where unused)."""
    tensors = [t for _, t in records]
    needing = [i for i, t in enumerate(tensors) if t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    if not needing:
        return grads
    got = torch.autograd.grad(outputs, [tensors[i] for i in needing], allow_unused=True)
    for i, g in zip(needing, got, strict=True):
        grads[i] = g
    return grads


# ------------------------------------------------------------------------------- results


def finalize(groups: list[ChannelGroup], raw: dict[int, torch.Tensor], fallback: Scores | None = None) -> Scores:
    """Finite, non-negative float32 CPU scores of length ``group.size`` for every prunable group.

    Groups missing from ``raw`` (nothing to tap) take ``fallback`` (or ones: no preference).
    NaNs become 0 and infinities the largest finite value.
    """
    out: Scores = {}
    for g in groups:
        if not g.prunable:
            continue
        s = raw.get(g.id)
        if s is None and fallback is not None:
            s = fallback.get(g.id)
        if s is None:
            s = torch.ones(g.size)
        s = s.detach().double().cpu().reshape(-1)
        if s.numel() != g.size:
            raise RuntimeError(f"criterion produced {s.numel()} scores for group {g.id} of size {g.size}")
        finite = torch.isfinite(s)
        big = s[finite].abs().max().item() if finite.any() else 1.0
        s = torch.nan_to_num(s, nan=0.0, posinf=big, neginf=0.0).clamp_min(0.0)
        s = s.clamp_max(min(big, 1e30))
        out[g.id] = s.float()
    return out


def weight_norm_scores(model: nn.Module, groups: list[ChannelGroup], p: float, filters_only: bool = True) -> Scores:
    """Sum over the group's producers of each channel's filter p-norm (the l1/l2 criteria).

    With ``filters_only``, conv/linear producers are used when the group has any; norms and bare
    parameters otherwise. Each member's norms are divided by their mean before summing, so a
    coupled residual group weighs its members equally whatever their fan-in.
    """
    raw: dict[int, torch.Tensor] = {}
    for g in groups:
        if not g.prunable:
            continue
        members = g.producers()
        if filters_only and any(is_filter_layer(model, m) for m in members):
            members = [m for m in members if is_filter_layer(model, m)]
        total = torch.zeros(g.size, dtype=torch.float64)
        for m in members:
            rows = filter_rows(model, m)
            if rows is None:
                continue
            n = rows.double().norm(p=p, dim=1)
            total += n / n.mean().clamp_min(1e-30)
        raw[g.id] = total
    return finalize(groups, raw)


def spatial_pool(t: torch.Tensor, max_side: int = 8) -> torch.Tensor:
    """``N x C x H x W`` averaged down to at most ``max_side`` per side (other shapes unchanged)."""
    if t.dim() == 4 and (t.shape[2] > max_side or t.shape[3] > max_side):
        return F.adaptive_avg_pool2d(t, (min(max_side, t.shape[2]), min(max_side, t.shape[3])))
    return t


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / max(1, b)))
