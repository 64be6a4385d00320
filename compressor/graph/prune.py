"""Plans applied to the model: physical pruning, masking and the soundness check."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compressor.channel_ops import ChannelScatter, MaskedLayerNorm
from compressor.graph.core import (
    ChannelGraph,
    PrunedModel,
    _dim_size,
    _is_depthwise,
    _is_grouped,
    _run,
    device_of,
    lookup,
)
from compressor.graph.trace import _build_dg, _safe_reshape_mapping
from compressor.groups import Plan


def conv_groups(graph: ChannelGraph, group_id: int) -> torch.Tensor | None:
    """For a group feeding or produced by a grouped convolution: the convolution group of each
    channel (kept counts must be equal in all of them); None for unconstrained groups."""
    part = graph._balance.get(group_id)
    return None if part is None else torch.as_tensor(part, dtype=torch.long)


def normalize_plan(graph: ChannelGraph, plan: Plan) -> Plan:
    """The plan ``apply_plan`` really applies.

    Groups tied to grouped convolutions (``conv_groups(graph, id)`` is not None) must keep the
    same number of channels in every convolution group. A plan that does not is rebalanced
    deterministically: the count is rounded up to a multiple of the number of convolution
    groups, over-full convolution groups drop their highest-index kept channels and under-full
    ones take back their lowest-index removed channels. Plan makers that want to control the
    choice should select the top channels per convolution group themselves.
    """
    out: Plan = {}
    for gid, kept in plan.items():
        keep = sorted({int(i) for i in torch.as_tensor(kept).flatten().tolist()})
        part = graph._balance.get(int(gid))
        size = graph.groups[int(gid)].size
        if part is not None and 0 < len(keep) < size:
            n_groups = max(part) + 1
            quota = -(-len(keep) // n_groups)
            chosen = []
            for b in range(n_groups):
                mine = [c for c in keep if part[c] == b]
                if len(mine) > quota:
                    mine = mine[:quota]
                elif len(mine) < quota:
                    extra = [c for c in range(size) if part[c] == b and c not in set(mine)]
                    mine = sorted(mine + extra[: quota - len(mine)])
                chosen.extend(mine)
            keep = sorted(chosen)
        out[int(gid)] = torch.as_tensor(keep, dtype=torch.long)
    return out


def _removed(graph: ChannelGraph, plan: Plan) -> dict[int, list[int]]:
    """Group id -> removed group channels; validates the plan."""
    out = {}
    for gid, kept in normalize_plan(graph, plan).items():
        group = graph.groups[int(gid)]
        keep = kept.tolist()
        if any(i < 0 or i >= group.size for i in keep):
            raise ValueError(f"plan for group {gid} ({group.root}) has indices outside 0..{group.size - 1}")
        if len(keep) == group.size:
            continue
        if not group.prunable:
            raise ValueError(f"plan prunes group {gid} ({group.root}), which is not prunable: {group.reason}")
        if len(keep) < 1:
            raise ValueError(f"plan keeps no channel of group {gid} ({group.root})")
        kept_set = set(keep)
        out[int(gid)] = [c for c in range(group.size) if c not in kept_set]
    return out


def _removed_by_dim(graph: ChannelGraph, removed: dict[int, list[int]]) -> dict[tuple[str, str], set[int]]:
    by_dim: dict[tuple[str, str], set[int]] = {}
    for gid, chans in removed.items():
        for link in graph._links[gid]:
            s = by_dim.setdefault((link.module, link.kind), set())
            for c in chans:
                s.update(link.indices[c])
    return by_dim


def apply_plan(graph: ChannelGraph, plan: Plan, *, share_untouched: bool = False) -> PrunedModel:
    """Physically remove every channel not kept by ``plan``, on a deep copy.

    ``share_untouched``: copy only the module structure and let modules the plan does not touch
    share their tensors with ``graph.model`` (several times faster than a deep copy; for throw-away
    probes that change nothing but the touched modules). Parameters then keep their
    ``requires_grad`` flags. When every touched module is a plain convolution, linear layer or
    BatchNorm, their tensors are sliced directly instead of building torch-pruning's graph.
    """
    removed = _removed(graph, plan)
    by_dim = _removed_by_dim(graph, removed)
    kept = _kept_records(graph, by_dim)
    model = (_structural_copy(graph.model) if share_untouched else copy.deepcopy(graph.model)).eval()
    if removed and not (share_untouched and _slice_directly(model, by_dim, kept)):
        grouped = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                   for name, m in model.named_modules() if _is_grouped(m)}
        dg = _build_dg(model, graph.example_input, graph._check_ops)
        for gid in sorted(removed):
            group = graph.groups[gid]
            root = model.get_submodule(group.root)
            root_link = next(lk for lk in graph._links[gid] if lk.module == group.root and lk.kind == "out")
            idxs = sorted(root_link.indices[c][0] for c in removed[gid])
            pruner = dg.get_pruner_of_module(root)
            with _safe_reshape_mapping():
                tp_group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
            tp_group.prune()
        _rebuild_grouped(model, grouped, kept)
    _check_kept(model, kept)
    if share_untouched:
        _own_tensors(model, graph.model, kept)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return PrunedModel(model=model.eval(), kept=kept, plan=normalize_plan(graph, plan))


def _kept_records(graph: ChannelGraph, by_dim: dict[tuple[str, str], set[int]]) -> dict[str, dict[str, list[int]]]:
    """``PrunedModel.kept``: kept indices of every changed module dimension, in the original's numbering."""
    kept: dict[str, dict[str, list[int]]] = {}
    for (name, kind), drop in by_dim.items():
        if not drop:
            continue
        obj = lookup(graph.model, name)
        if obj is None or isinstance(obj, ChannelScatter):
            continue
        size = graph._dims.get((name, kind))
        if size is None:
            continue
        kept.setdefault(name, {})[kind] = [i for i in range(size) if i not in drop]
        if isinstance(obj, nn.Module) and _is_depthwise(obj):
            kept[name]["in"] = kept[name]["out"]
    return kept


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _slice_directly(model: nn.Module, by_dim: dict[tuple[str, str], set[int]],
                    kept: dict[str, dict[str, list[int]]]) -> bool:
    """Slice the kept channels out of ``model`` (a structural copy) when every changed module is an
    ungrouped convolution, a linear layer or a BatchNorm; False (nothing changed) otherwise."""
    modules = {name: lookup(model, name) for (name, _), drop in by_dim.items() if drop}
    for module in modules.values():
        plain_conv = type(module) in _PLAIN_CONVS and module.groups == 1
        if not (plain_conv or type(module) in (nn.Linear, *_PLAIN_NORMS)):
            return False
    if set(kept) != set(modules):
        return False
    for name, dims in kept.items():
        module = modules[name]
        for kind, keep in dims.items():
            index = torch.as_tensor(keep, dtype=torch.long)
            if type(module) in _PLAIN_NORMS:
                for key in ("weight", "bias"):
                    if module._parameters.get(key) is not None:
                        module._parameters[key] = nn.Parameter(module._parameters[key].detach()[index],
                                                               requires_grad=False)
                for key in ("running_mean", "running_var"):
                    if module._buffers.get(key) is not None:
                        module._buffers[key] = module._buffers[key][index]
                module.num_features = len(keep)
                continue
            dim = 0 if kind == "out" else 1
            module._parameters["weight"] = nn.Parameter(module.weight.detach().index_select(dim, index),
                                                        requires_grad=False)
            if kind == "out" and module.bias is not None:
                module._parameters["bias"] = nn.Parameter(module.bias.detach()[index], requires_grad=False)
            attr = {("out", True): "out_features", ("in", True): "in_features",
                    ("out", False): "out_channels", ("in", False): "in_channels"}[kind, isinstance(module, nn.Linear)]
            setattr(module, attr, len(keep))
    return True


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors.

    Pruning replaces tensors rather than writing into them, so the original is left intact;
    containers (hooks, parameter and buffer dicts) are copied so registering on the copy does not
    reach the original.
    """
    new = object.__new__(type(module))
    for key, value in module.__dict__.items():
        new.__dict__[key] = type(value)(value) if isinstance(value, (dict, set, list)) else value
    new._modules = {k: None if m is None else _structural_copy(m) for k, m in module._modules.items()}
    return new


def _own_tensors(model: nn.Module, original: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    """Give every module the plan touched its own copy of tensors still shared with ``original``."""
    shared = {id(t) for t in (*original.parameters(), *original.buffers())}
    for name in kept:
        module = lookup(model, name)
        if not isinstance(module, nn.Module):
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and id(t) in shared:
                    clone = t.detach().clone()
                    table[key] = nn.Parameter(clone, requires_grad=False) if isinstance(t, nn.Parameter) else clone


def _rebuild_grouped(model: nn.Module, snapshots: dict, kept: dict[str, dict[str, list[int]]]) -> None:
    """torch-pruning slices grouped convolutions' input weights as if they were dense; rebuild
    them from the original weights: output o of conv-group g reads its group's kept inputs."""
    for name, (weight, bias) in snapshots.items():
        rec = kept.get(name)
        if not rec:
            continue
        conv = model.get_submodule(name)
        g = conv.groups
        out_size, in_width = weight.shape[0], weight.shape[1]
        in_size = in_width * g
        kept_out = rec.get("out", list(range(out_size)))
        kept_in = rec.get("in", list(range(in_size)))
        out_width = out_size // g
        rows = []
        for o in kept_out:
            b = o // out_width
            local = [i - b * in_width for i in kept_in if i // in_width == b]
            rows.append(weight[o, local])
        new_w = torch.stack(rows)
        if new_w.shape[1] * g != len(kept_in):
            raise RuntimeError(f"grouped convolution {name}: unbalanced input channels per group")
        conv.weight = nn.Parameter(new_w.contiguous())
        if bias is not None:
            conv.bias = nn.Parameter(bias[torch.as_tensor(kept_out, dtype=torch.long)].clone())
        conv.in_channels, conv.out_channels = len(kept_in), len(kept_out)


def _check_kept(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    """The pruned modules must have exactly the recorded sizes (catches silent divergence)."""
    for name, rec in kept.items():
        obj = lookup(model, name)
        for kind, idx in rec.items():
            if isinstance(obj, torch.Tensor):
                if len(idx) not in obj.shape:
                    raise RuntimeError(f"pruned parameter {name} has shape {tuple(obj.shape)}, expected {len(idx)}")
                continue
            size = _dim_size(obj, kind)
            if size is not None and size != len(idx):
                raise RuntimeError(f"pruned {name} has {size} {kind} channels, the plan keeps {len(idx)}")


# --------------------------------------------------------------------------- masking


def mask_model(graph: ChannelGraph, plan: Plan) -> nn.Module:
    """A deep copy of ``graph.model`` whose removed channels are zeroed at their producers.

    LayerNorms touched by the plan are replaced by :class:`MaskedLayerNorm`, which normalizes
    over the kept channels only (what the pruned LayerNorm computes).
    """
    removed = _removed(graph, plan)
    model = copy.deepcopy(graph.model).eval()
    by_dim = _removed_by_dim(graph, removed)
    with torch.no_grad():
        for (name, kind), drop in by_dim.items():
            if kind != "out" or not drop:
                continue
            idx = torch.as_tensor(sorted(drop), dtype=torch.long)
            obj = lookup(model, name)
            if isinstance(obj, torch.Tensor):
                dim = _param_dim(graph, name, obj)
                obj.index_fill_(dim, idx, 0.0)
                continue
            if isinstance(obj, ChannelScatter):  # removed output channels read the zero channel
                obj.gather.index_fill_(0, idx, obj.in_channels)
                continue
            for attr in ("weight", "bias"):
                t = getattr(obj, attr, None)
                if isinstance(t, torch.Tensor):
                    t.index_fill_(0, idx, 0.0)
            if isinstance(obj, nn.modules.batchnorm._NormBase) and obj.running_mean is not None:
                obj.running_mean.index_fill_(0, idx, 0.0)
                obj.running_var.index_fill_(0, idx, 1.0)
        for name, channels_first in graph._norms.items():
            drop = by_dim.get((name, "out"))
            if not drop:
                continue
            norm = model.get_submodule(name)
            keep = [i for i in range(norm.normalized_shape[-1]) if i not in drop]
            _set_submodule(model, name, MaskedLayerNorm(norm, keep, channels_first))
    return model


def _param_dim(graph: ChannelGraph, name: str, param: torch.Tensor) -> int:
    size = graph._dims.get((name, "out"))
    for d, s in enumerate(param.shape):
        if s == size and s > 1:
            return d
    return 0


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def soundness_diff(graph: ChannelGraph, plan: Plan, pruned: nn.Module, inputs: torch.Tensor) -> float:
    """Max |pruned(x) - masked_original(x)| over ``inputs``."""
    device = device_of(pruned)
    masked = mask_model(graph, plan).to(device)
    inputs = inputs.to(device)
    was_training = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            a = _run(pruned, inputs)
            b = _run(masked, inputs)
    finally:
        pruned.train(was_training)
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def random_plan(graph: ChannelGraph, keep_ratio: float = 0.5, seed: int = 0) -> Plan:
    """A random plan keeping about ``keep_ratio`` of every prunable group (tests, probing)."""
    gen = torch.Generator().manual_seed(seed)
    plan: Plan = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        m = max(1, g.multiple)
        k = max(g.min_channels, int(round(g.size * keep_ratio)))
        k = min(g.size, -(-k // m) * m)
        part = graph._balance.get(g.id)
        if part is None:
            plan[g.id] = torch.randperm(g.size, generator=gen)[:k].sort().values
            continue
        part_t = torch.as_tensor(part)
        n_groups = int(part_t.max()) + 1
        chosen = []
        for b in range(n_groups):
            mine = torch.nonzero(part_t == b).flatten()
            chosen.append(mine[torch.randperm(len(mine), generator=gen)[: k // n_groups]])
        plan[g.id] = torch.cat(chosen).sort().values
    return plan
