"""Step 3 of building the graph: torch-pruning's groups become checked :class:`ChannelGroup` s."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from compressor.channel_ops import ChannelScatter
from compressor.graph.core import ChannelGraph, _dim_size, _is_depthwise, _is_grouped, _Link, _run
from compressor.graph.cost import _build_cost_table
from compressor.graph.prune import apply_plan, random_plan, soundness_diff
from compressor.graph.rewrite import _rewrite_channel_pads
from compressor.graph.trace import _Barrier, _build_dg, _node_problem, _safe_reshape_mapping
from compressor.groups import ChannelGroup, GroupMember, Plan


def build_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignore: Sequence[str] = (),
    min_channels: int = 1,
    round_to: int = 1,
    round_min_channels: int = 0,
    rewrite: bool = True,
    check_ops: bool = True,
    verify: bool = False,
) -> ChannelGraph:
    """Trace ``model`` and return its channel groups.

    Args:
        ignore: module-name globs (fnmatch; a glob also matches the module's children); any
            group touching such a module is left whole ("ignored by --ignore").
        min_channels: per-group floor of the kept count (clipped to the group size).
        round_to: kept counts must be multiples of this (device alignment).
        round_min_channels: only groups of at least this many channels are rounded to ``round_to``;
            narrower ones keep any count (0: every group).
        rewrite: map channel-dim zero padding through ChannelScatter (turning it off is only
            for tests demonstrating what the check catches).
        check_ops: apply the trust checks on the ops torch-pruning handled (tests only).
        verify: prune a random ~50% plan and compare it with the masked model; groups that fail
            alone are then marked not prunable.
    """
    model.eval()
    example_input = example_input[:1].detach()
    work = _rewrite_channel_pads(model, example_input) if rewrite else model
    work.eval()
    dg = _build_dg(work, example_input, check_ops)
    module2name = {m: n for n, m in work.named_modules()}
    param2name = dict(dg._param_to_name)
    ops = tp.ops

    graph = ChannelGraph(model=work, example_input=example_input)
    graph._check_ops = check_ops
    seen_roots: set[nn.Module] = set()
    failed: set[str] = set()
    root_types = (nn.modules.conv._ConvNd, nn.Linear)
    for module in list(dg.module2node.keys()):
        if not isinstance(module, root_types) or module in seen_roots:
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        size = int(pruner.get_out_channels(module))
        root_name = module2name[module]
        try:
            with _safe_reshape_mapping():
                tp_group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping failed
            gid = len(graph.groups)
            graph.groups.append(ChannelGroup(
                id=gid, root=root_name, size=size,
                members=[GroupMember(root_name, "out", tuple(range(size)))], prunable=False,
                reason=f"torch-pruning could not map this group ({type(exc).__name__})",
                multiple=1, min_channels=max(1, min(int(min_channels), size)),
            ))
            graph._links[gid] = [_Link(root_name, "out", [(i,) for i in range(size)])]
            graph._dims[(root_name, "out")] = size
            failed.add(root_name)
            seen_roots.add(module)
            continue
        problems: list[str] = []
        maps: dict[tuple[str, str], dict[int, list[int]]] = {}
        is_param: dict[tuple[str, str], bool] = {}
        objs: dict[tuple[str, str], object] = {}
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            root_idxs = item.root_idxs
            target = dep.target
            obj = target.module
            handler = dep.handler.__name__
            kind = "in" if "in_channels" in handler else "out"
            if isinstance(obj, nn.Parameter) or isinstance(obj, torch.Tensor):
                name = param2name.get(obj)
                if name is None:
                    problems.append("an unnamed parameter")
                    continue
                key = (name, "out")
                is_param[key] = True
            elif obj in module2name and not isinstance(obj, tp.ops._ElementWiseOp):
                name = module2name[obj]
                if isinstance(obj, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)):
                    kind = "out"
                if _is_depthwise(obj):
                    kind = "out"
                key = (name, kind)
                is_param[key] = False
                if isinstance(obj, root_types) and kind == "out":
                    seen_roots.add(obj)
                if isinstance(obj, nn.modules.conv._ConvTransposeNd):
                    problems.append(f"transposed convolution {name}")
                if isinstance(obj, nn.GroupNorm):
                    problems.append(f"GroupNorm {name} (statistics span channels)")
                if isinstance(obj, nn.LayerNorm) and len(obj.normalized_shape) != 1:
                    problems.append(f"LayerNorm {name} over {tuple(obj.normalized_shape)}")
                if isinstance(obj, nn.LayerNorm) and len(obj.normalized_shape) == 1:
                    cls = type(obj).__name__
                    if type(obj) is nn.LayerNorm:
                        graph._norms[name] = False
                    elif cls == "LayerNorm2d":
                        graph._norms[name] = True
                    else:
                        problems.append(f"LayerNorm subclass {cls} at {name}")
                if not isinstance(obj, (root_types, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                        nn.PReLU, ChannelScatter)):
                    problems.append(f"module {name} of type {type(obj).__name__}")
            else:
                if isinstance(obj, _Barrier):
                    problems.append(obj.reason)
                elif target.type == ops.OPTYPE.OUTPUT or target.grad_fn in dg._cc_outputs:
                    problems.append("model output channels")
                elif check_ops and target.inputs:  # input-less nodes only transform parameters (e.g. W.t())
                    why = _node_problem(target, dg)
                    if why:
                        problems.append(why)
                continue
            if kind == "out" and (not target.outputs or target.grad_fn in dg._cc_outputs):
                problems.append("model output channels")
            objs[key] = obj
            bucket = maps.setdefault(key, {})
            for i, r in zip(idxs, root_idxs, strict=True):
                lst = bucket.setdefault(int(r), [])
                if int(i) not in lst:
                    lst.append(int(i))
        links = []
        for key, bucket in maps.items():
            name, kind = key
            if set(bucket) != set(range(size)):
                problems.append(f"{name} sees only part of the channels (split across branches)")
                continue
            indices = [tuple(sorted(bucket[c])) for c in range(size)]
            flat = [i for t in indices for i in t]
            if len(set(flat)) != len(flat):
                problems.append(f"{name} receives a channel twice")
            links.append(_Link(name, kind, indices, is_param[key]))
            obj = objs[key]
            dim = _dim_size(obj, kind, dg.module2node[obj].pruning_dim if is_param[key] else None)
            if dim is not None:
                graph._dims[key] = dim
                if max(flat) >= dim:
                    problems.append(f"channel indices beyond the {dim} {kind} channels of {name} (broadcast?)")
        gid = len(graph.groups)
        members = [
            GroupMember(link.module, link.kind, tuple(t[0] for t in link.indices))
            for link in links
            if all(len(t) == 1 for t in link.indices) and not isinstance(objs[(link.module, link.kind)], ChannelScatter)
        ]
        group = ChannelGroup(id=gid, root=root_name, size=size, members=members)
        group.multiple = max(1, int(round_to)) if size >= round_min_channels else 1
        floor = int(min_channels)
        partitions = set()
        for link in links:
            obj = objs[(link.module, link.kind)]
            if not _is_grouped(obj):
                continue
            width = _dim_size(obj, link.kind) // obj.groups
            if width <= 1 or any(len(t) != 1 for t in link.indices):
                problems.append(f"grouped convolution {link.module} (groups={obj.groups}) with group width {width}")
                continue
            partitions.add(tuple(t[0] // width for t in link.indices))
            group.multiple = math.lcm(group.multiple, obj.groups)
            floor = max(floor, obj.groups)
        if len(partitions) > 1:
            problems.append("grouped convolutions with different channel partitions")
        elif partitions:
            graph._balance[gid] = list(partitions.pop())
        group.min_channels = max(1, min(floor, size))
        group.single_allowed = group.multiple > 1 and not partitions and group.min_channels == 1
        if problems:
            group.prunable = False
            group.reason = "; ".join(dict.fromkeys(problems))
        elif ignore and any(_matches(link.module, ignore) for link in links):
            group.prunable = False
            group.reason = "ignored by --ignore"
        elif size <= 1:
            group.prunable = False
            group.reason = "a single channel"
        graph.groups.append(group)
        graph._links[gid] = links

    if failed:
        for group in graph.groups:
            if group.prunable and any(link.module in failed and link.kind == "out" for link in graph._links[group.id]):
                group.prunable = False
                group.reason = "coupled with a group torch-pruning could not map"
    _build_cost_table(graph)
    if verify:
        _verify_groups(graph)
    return graph


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


# --------------------------------------------------------------------------- verification


def _verify_groups(graph: ChannelGraph, tol: float = 1e-4) -> None:
    x = torch.randn((2,) + tuple(graph.example_input.shape[1:]), generator=torch.Generator().manual_seed(0))

    def ok(plan: Plan) -> tuple[bool, str]:
        try:
            pruned = apply_plan(graph, plan)
            with torch.no_grad():
                scale = float(_run(graph.model, x).abs().max())
            diff = soundness_diff(graph, plan, pruned.model, x)
        except Exception as exc:  # noqa: BLE001 - any failure means the group is not trusted
            return False, f"probe failed: {type(exc).__name__}: {exc}"[:200]
        return diff <= tol * max(1.0, scale) + tol, f"probe mismatch {diff:.3g}"

    plan = random_plan(graph)
    if not plan or ok(plan)[0]:
        return
    for gid in list(plan):
        good, why = ok({gid: plan[gid]})
        if not good:
            graph.groups[gid].prunable = False
            graph.groups[gid].reason = why
