"""Block-wise reconstruction: gradient steps on one block at a time, fed the already repaired upstream.

After ``lsq`` each layer is the best linear fit to its own original output; what remains is what a
block's layers could do together through their nonlinearities. This method cuts the network into
blocks at the points where a single tensor carries everything forward (the output of a residual
block, or of a conv-BN-ReLU in a plain network; consecutive pieces are joined until a block holds
at least MIN_LAYERS conv/linear layers). Block by block, in execution order, it runs a few Adam
steps on the block's conv/linear weights so that the block's output, given the input the pruned
and already repaired upstream produces, matches the original block's output on the same images
(kept channels; squared error relative to the original's energy). No labels; BatchNorm statistics
stay as they are (eval mode). Every 8th calibration image is held out, and a block keeps its new
weights only when its held-out error went down.

Against ``mimic`` (all layers at once, pulled toward every BatchNorm output), a block's problem
is small and its target is the block's own output, so the steps are cheaper and go at least as far.
After ``lsq`` (1,024 images, 5,000 val images, 100 steps a block at lr 1e-3, 2-core CPU): ResNet-56
84.30% -> 85.78% at 50% FLOPs and 81.86% -> 84.02% at 40% (69-107 s; ``mimic``: 85.72% and 83.62%
for 144-191 s); vgg_cifar 79.00% -> 79.16% and 78.68% -> 79.18% (about 20 s); torchvision resnet18
72.92% -> 73.32% and mobilenet_v2 57.46% -> 57.88% at 50% (26 s each). Tried on ResNet-56 at 50% in a
prototype (the stem its own block; 86.00% with these settings) and not adopted: lr 3e-3 (85.52%),
BatchNorm affine parameters trained as well (85.80%), 300 steps a block (86.04%, three times the time).
Fewer steps, to fit a 60-second run, give back most of the gain (ResNet-56, 50% / 40%, batch 128):
10 steps 84.52% / 82.58%, 25 steps 85.32% / 82.58%, 50 steps 85.62% / 83.42% (14-43 s); about 8.5 s
is fixed (the forward passes, and torch._dynamo imported by the first Adam). Batch 64 at 100 steps
matched batch 128 on ResNet-56 (85.66% / 84.02%, 43 s instead of 69 s) but was 0.1-0.3 points below it
on vgg_cifar, resnet18 and mobilenet_v2, so BATCH stays 128. With 64 calibration images (56 fitted)
the gain is small or negative (ResNet-56 +0.1 / +1.4 points, vgg_cifar -0.3 / +0.1).
Larger blocks (at least 4 or 6 conv layers, i.e. two or three residual blocks at once) did not help
on ResNet-56: 85.42% / 84.04% and 85.32% / 83.50% against MIN_LAYERS=2's 85.74% / 84.02%.
Nor did feeding each block, element by element with probability 0.5, the original's input instead of
the repaired one (as QDrop does for quantization): 85.68% / 83.66% against a control of 85.70% / 84.02%.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import BN_TYPES, LAYER_TYPES, image_cap, require_calib
from compressor.recovery.lsq import _trace_pair, run_node

STEPS = 100  # per block
LEARNING_RATE = 1e-3  # Adam, cosine decay; 3e-3 did worse on ResNet-56
BATCH = 128
MIN_LAYERS = 2
HOLDOUT_EVERY = 8
PASS_BATCH = 256  # images per forward pass when propagating a whole block


def _channel_index(gm: fx.GraphModule, kept: dict) -> dict[fx.Node, list[int] | None]:
    """Kept original channels (dim 1) of each node's output; None: all of them. Missing: unknown."""
    idx: dict[fx.Node, list[int] | None] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            idx[node] = None
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), (*LAYER_TYPES, *BN_TYPES)):
            idx[node] = kept.get(node.target, {}).get("out")
        elif node.op in ("call_module", "call_function", "call_method"):
            tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]  # not constants (index buffers)
            if tensors and all(a in idx for a in tensors):
                idx[node] = idx[tensors[0]]  # elementwise ops, pooling, additions of equally mapped operands
    return idx


def find_blocks(gm: fx.GraphModule, min_layers: int = MIN_LAYERS) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(input node, nodes) of each block: runs between single-tensor cut points with min_layers layers."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position.get(u, len(nodes)) for u in n.users), default=position[n]) for n in nodes}
    dying: dict[int, list[fx.Node]] = {}
    for n in nodes:
        dying.setdefault(last_use[n], []).append(n)
    live = {nodes[0]} - set(dying.get(0, []))  # tensors still needed after the current node (constants aside)
    blocks, start, layers = [], nodes[0], 0
    current: list[fx.Node] = []
    for i, node in enumerate(nodes[1:], start=1):
        current.append(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYER_TYPES):
            layers += 1
        if node.op != "get_attr":
            live.add(node)
        live.difference_update(dying.get(i, []))
        if layers >= min_layers and live == {node} and not _unary_follower(gm, node, nodes[i + 1 :]):
            blocks.append((start, current))
            start, current, layers = node, [], 0
    if current:
        if layers or not blocks:
            blocks.append((start, current))
        else:  # a tail without layers (e.g. a flatten) joins the last block
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + current)
    return blocks


def _unary_follower(gm: fx.GraphModule, node: fx.Node, rest: list[fx.Node]) -> bool:
    """Whether the next node only transforms ``node`` (a ReLU, BN, pooling): the block then ends after it.

    A block ending at a residual addition would have to match the values its ReLU discards.
    """
    if not rest or list(node.users) != [rest[0]] or rest[0].all_input_nodes != [node] or rest[0].op == "output":
        return False
    nxt = rest[0]
    return not (nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), LAYER_TYPES))


def _run_block(gm: fx.GraphModule, start: fx.Node, body: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
    env = {start: x}
    for node in body:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":  # a constant defined in an earlier block
                env[arg] = run_node(gm, arg, env, x)
        env[node] = run_node(gm, node, env, x)
    return env[body[-1]]


def _run_batched(gm, start, body, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_run_block(gm, start, body, x[i : i + PASS_BATCH]) for i in range(0, len(x), PASS_BATCH)])


def reconstruct_blocks(original: nn.Module, pruned: nn.Module, kept: dict, calib: torch.Tensor, *,
                       device: str = "cpu", steps: int | None = None, lr: float | None = None, seed: int = 0,
                       log=None) -> dict:
    """Adam steps block by block on ``pruned`` (in place); returns per-block held-out errors.

    ``steps`` (per block) and ``lr`` default to STEPS and LEARNING_RATE; ``log`` receives a line per block.
    """
    steps = STEPS if steps is None else steps
    lr = LEARNING_RATE if lr is None else lr
    traced = _trace_pair(original, pruned)
    if traced is None or len(calib) < 2 * HOLDOUT_EVERY:
        return {"status": "skipped", "reason": "not fx-traceable" if traced is None else "too few images"}
    gm_o, gm_p = traced
    to_orig = dict(zip(gm_p.graph.nodes, gm_o.graph.nodes, strict=True))
    index = _channel_index(gm_p, kept)
    blocks = find_blocks(gm_p)
    calib = calib[: image_cap(original, calib, device)].to(device)
    hold = torch.zeros(len(calib), dtype=torch.bool)
    hold[::HOLDOUT_EVERY] = True
    train = torch.nonzero(~hold).flatten()
    gen = torch.Generator().manual_seed(seed)
    original.eval()
    pruned.eval()
    flags = {p: p.requires_grad for p in pruned.parameters()}
    for p in pruned.parameters():
        p.requires_grad_(False)
    x_p = x_o = calib
    results = []
    try:
        for number, (start, body) in enumerate(blocks):
            y_full = _run_batched(gm_o, to_orig[start], [to_orig[n] for n in body], x_o)
            out = body[-1]
            channels = index.get(out)
            y_o = y_full if channels is None else y_full[:, torch.as_tensor(channels, dtype=torch.long)]
            params = [p for n in body if n.op == "call_module"
                      and isinstance(gm_p.get_submodule(n.target), LAYER_TYPES)
                      for p in gm_p.get_submodule(n.target).parameters()]
            result = {"block": number, "end": out.name, "status": "kept"}
            if out in index and params and y_o.shape[1:] == _run_block(gm_p, start, body, x_p[:1]).shape[1:]:
                result.update(_fit_block(gm_p, start, body, x_p, y_o, params, hold, train, gen, steps, lr))
            results.append(result)
            if log is not None and "before" in result:
                log(f"block {number + 1}/{len(blocks)} (to {out.name}): held-out error "
                    f"{result['before']:.4f} -> {result['after']:.4f}, {result['status']}")
            x_p, x_o = _run_batched(gm_p, start, body, x_p), y_full
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {"status": "done", "blocks": results}


def _fit_block(gm, start, body, x, y, params, hold, train, gen, steps, lr) -> dict:
    energy = float((y**2).mean().clamp_min(1e-12))

    def held_error() -> float:
        with torch.no_grad():
            return float(((_run_block(gm, start, body, x[hold]) - y[hold]) ** 2).mean()) / energy

    saved = [p.detach().clone() for p in params]
    before = held_error()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(steps):
            pick = train[torch.randint(0, len(train), (min(BATCH, len(train)),), generator=gen)]
            loss = ((_run_block(gm, start, body, x[pick]) - y[pick]) ** 2).mean() / energy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    after = held_error()
    accepted = after == after and after < before
    if not accepted:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return {"before": before, "after": after, "status": "refit" if accepted else "kept"}


@register
class BlockwiseReconstruction(RecoveryMethod):
    name = "block"
    description = (
        "block-wise reconstruction: per residual or conv block, Adam steps pulling its output (fed the repaired "
        "upstream) toward the original's; kept per block only if held-out images agree; for after lsq"
    )
    needs_data = True

    def __init__(self) -> None:
        self.last_info: dict = {}

    def apply(self, ctx: RecoveryContext) -> None:
        calib = require_calib(ctx, self.name)
        self.last_info = reconstruct_blocks(ctx.original, ctx.pruned, ctx.kept, calib, device=ctx.device,
                                            log=ctx.log)
        if self.last_info["status"] == "skipped" and ctx.log is not None:
            ctx.log(f"block: skipped ({self.last_info['reason']})")
