"""MAC counts: the fast per-group estimate the width search uses, and the exact count."""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.graph.core import ChannelGraph, _is_depthwise, _Layer, device_of, run_hooked


def _build_cost_table(graph: ChannelGraph) -> None:
    model, x = graph.model, graph.example_input
    positions: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            def hook(mod, _inp, out, name=name):
                ch = mod.out_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.out_features
                positions[name] = positions.get(name, 0) + out.numel() // ch // max(1, out.shape[0])
            hooks.append(m.register_forward_hook(hook))
    run_hooked(model, x, hooks)
    by_key: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for gid, links in graph._links.items():
        for link in links:
            by_key.setdefault((link.module, link.kind), []).append((gid, len(link.indices[0])))
    for name, m in model.named_modules():
        if name not in positions:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            out_size, in_size, groups = m.out_channels, m.in_channels, m.groups
            kernel = math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            out_size, in_size, groups, kernel = m.out_features, m.in_features, 1, 1
        else:
            continue
        row = _Layer(name, positions[name] * kernel, out_size, in_size, groups, _is_depthwise(m))
        row.out_terms = by_key.get((name, "out"), [])
        row.in_terms = [] if row.depthwise else by_key.get((name, "in"), [])
        row.out_fixed = out_size - sum(graph.groups[g].size * k for g, k in row.out_terms)
        row.in_fixed = in_size - sum(graph.groups[g].size * k for g, k in row.in_terms)
        graph._layers.append(row)
        for gid in {gid for gid, _ in (*row.out_terms, *row.in_terms)}:
            graph._layers_of_group.setdefault(gid, []).append(row)


def estimate_macs(graph: ChannelGraph, kept_counts: dict[int, int]) -> int:
    """Fast MAC count of the model with ``kept_counts[group_id]`` channels kept per group.

    Counts convolution and linear layers (as :func:`count_macs_params` does).
    """
    return _rows_macs(graph, graph._layers, kept_counts)


def estimate_macs_change(graph: ChannelGraph, kept_counts: dict[int, int], group_id: int, count: int) -> int:
    """``estimate_macs`` with group ``group_id`` at ``count`` minus ``estimate_macs`` at ``kept_counts``,
    summed over the layers that group touches only (a greedy search asks this thousands of times)."""
    rows = graph._layers_of_group.get(group_id, [])
    return _rows_macs(graph, rows, {**kept_counts, group_id: count}) - _rows_macs(graph, rows, kept_counts)


def _rows_macs(graph: ChannelGraph, rows, kept_counts: dict[int, int]) -> int:
    total = 0
    groups = graph.groups
    get = kept_counts.get
    for row in rows:
        out = row.out_fixed
        for gid, k in row.out_terms:
            out += get(gid, groups[gid].size) * k
        if row.depthwise:
            total += row.positions_kernel * out
            continue
        cin = row.in_fixed
        for gid, k in row.in_terms:
            cin += get(gid, groups[gid].size) * k
        total += row.positions_kernel * out * cin // row.groups
    return int(total)


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Exact (MACs, parameters) of ``model`` for one ``example_input`` batch.

    MACs of convolutions and linear layers (multiply-accumulates per sample of the batch).
    """
    macs = [0]
    hooks = []

    def hook(mod, _inp, out):
        if isinstance(mod, nn.modules.conv._ConvNd):
            per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        else:
            per_out = mod.in_features
        macs[0] += out.numel() // max(1, out.shape[0]) * per_out

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        run_hooked(model, example_input[:1].to(device_of(model)), hooks)
    finally:
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return int(macs[0]), int(params)
