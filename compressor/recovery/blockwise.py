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

Blocks whose output maps are wider than INTERIOR plus twice their margin step on random square
crops of the input (offsets aligned with the block's stride), and the loss counts only the output
positions the crop's cut edges cannot reach: the margin is measured per block, so any operator inside
is handled, and the crop is sized to leave INTERIOR x INTERIOR such positions (10x10 input pixels for a
stride-1 block of two 3x3 convolutions; 56x56 for resnet18's stem block at 224x224, which on whole
images took 53 of the 141 s `block` spent on that network with 256 images). A step on whole 32x32
maps fits more than a thousand positions per image, far more than a step needs: on
ResNet-56 (1,024 images, 5,000 val images) fixed crops of 12 took the block stage from 67 s / 63 s to
36 s / 36 s at 50% / 40% FLOPs for 85.62% / 84.10% against 85.70% / 83.98% on whole images; on a
vgg_cifar trained anew (80.90%; ``lsq`` alone 76.38% / 76.44%) 76.70% / 76.86% against 76.60% /
76.74%, 10.6 s / 9.0 s against 13.8 s / 12.1 s.

During the steps each conv and the eval-mode BatchNorm after it run as one convolution (the conv's
own weight, scaled per output channel inside the call, stays the parameter, so the gradients are
those of the pair), and the loss is ``F.mse_loss``, whose backward is one fused op: BatchNorm's
backward over the whole activation and the squared difference's took over a quarter of a step on
ResNet-56 (block stage 41 s -> 32 s at 50% FLOPs, 85.62% -> 85.64%). BATCH is 64: with the folding,
batch 128 -> 64 took the ResNet-56 stage from 33 s / 29 s to 20 s / 20 s (50% / 40%) for 85.64% /
84.08% -> 85.58% / 83.90%, and vgg_cifar's from 10.5 s / 8.7 s to 6.5 s / 5.8 s for 76.70% / 76.86%
-> 76.60% / 76.82%. Cheaper still and not adopted (ResNet-56 50% / 40%, vgg_cifar 50% / 40%, ResNet-56
seconds): batch 32, 85.56% / 84.14%, 76.46% / 76.62%, 17 s; 50 steps, 85.52% / 83.38%, 76.22% / 76.56%,
15 s; 70 steps at batch 48, 85.48% / 83.52%, 76.38% / 76.38%, 15 s; 50 steps at lr 2e-3 (batch 128),
85.22% / 82.98%. About 7 s of ResNet-56's stage is fixed, mostly the two forward passes over the
calibration images that carry each block's input along (channels-last passes: 1 s faster, lost again
in layout conversions). ``lsq`` on a spread half of the images before ``block`` was level on
ResNet-56 (85.66% / 84.26%) and 5 s faster, but lost 0.4 / 0.6 points on vgg_cifar.
Crops sized per block replaced fixed 12-pixel crops, which fitted only 2x2 positions of a stride-2
block and none of a large stem: with INTERIOR 6, ResNet-56 85.82% / 84.08% and vgg_cifar 76.68% /
76.88% (fixed crops: 85.58% / 83.90% and 76.60% / 76.82%) in about the same time; INTERIOR 8 gave
85.84% / 83.88% and 76.68% / 76.88% for 3-5 s more, INTERIOR 4 85.72% / 83.72% and 76.72% / 76.96%
for about 3 s less.

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
is fixed (the forward passes, and torch._dynamo, which torch.optim.Adam imported; CosineAdam avoids
it). Batch 64 at 100 steps matched batch 128 on ResNet-56 (85.66% / 84.02%, 43 s instead of 69 s)
but was 0.1-0.3 points below it on vgg_cifar, resnet18 and mobilenet_v2 (before crops and folding). With 64
calibration images (56 fitted) the gain is small or negative (ResNet-56 +0.1 / +1.4 points, vgg_cifar -0.3 / +0.1).
Larger blocks (at least 4 or 6 conv layers, i.e. two or three residual blocks at once) did not help
on ResNet-56: 85.42% / 84.04% and 85.32% / 83.50% against MIN_LAYERS=2's 85.74% / 84.02%.
Nor did feeding each block, element by element with probability 0.5, the original's input instead of
the repaired one (as QDrop does for quantization): 85.68% / 83.66% against a control of 85.70% / 84.02%.
With crops (ResNet-56 85.62% / 84.10%, the new vgg_cifar 76.70% / 76.86%, batch 128), not adopted:
keeping the best of checkpoints every 10 steps by
held-out error (85.88% / 84.16%; vgg_cifar 76.70% / 76.86%), Adam's step size relative to each layer's
weight RMS (x0.03: 85.58% / 83.84%; vgg_cifar 76.60% / 76.90%), a 20-step warm-up (vgg_cifar 76.64% /
76.82%). On that vgg_cifar the last three blocks (0.08-1.2 M weights each) keep the ``lsq`` weights: their
held-out error rises in the first steps and ends above its start (the training images' error ends
below it), so 896 images are too few to fit them further.
On ResNet-56, though, more varied inputs did not help (fifteenth session, after ``lsq``, 1,024 images,
5,000 val images, 50% / 40% FLOPs; control 86.10% / 85.18%, training error 0.072 / 0.097 against
held-out 0.081 / 0.109 averaged over blocks): each block's input maps and the original's output for them
mirrored as a second copy of the images, 85.56% / 84.88%; mixup of the inputs within a batch (Beta(0.4,
0.4), the original block run on the same mixed inputs for the target), 85.96% / 84.90%, 1.5x the time.
Nor did mirrored *images* (sixteenth session: the 1,024 calibration images and their mirror images run
through both networks, so every block sees inputs a real image produces; same ``lsq`` and widths,
5,000 val images): 85.88% / 85.18% against 86.06% / 85.22% at 50% / 40%, for 1.4x the block time.

On a CPU with native bfloat16 (AVX512-BF16 or AMX; ``common.bf16_supported``) the steps' ungrouped conv-BN
convolutions with kernels wider than 1x1 run in bfloat16, float32 in and out; the weights, the loss, the
optimizer and the held-out check stay float32 (sixteenth session). Depthwise convolutions stay float32:
on the half-width CIFAR MobileNetV2 of ``bench/cifar_shapes.py`` (50% FLOPs, alternated in one process),
its block stage took 12.7-15.5 s in float32, 19.3-20.3 s with every convolution or every 3x3 one
(depthwise included) in bfloat16, 14.2-14.9 s with every ungrouped one (1x1 too) and 13.1-15.2 s with
the rule kept (there only the stem). 1x1 convolutions stay float32 too: nothing measured here gained
from them. ResNet-56's block stage at 50% FLOPs, alternated in one process after the same ``lsq``:
18.2-21.6 s -> 15.9-18.2 s over four pairs, mean held-out error 0.08119 -> 0.08118. Whole runs, seeds 0 / 1 / 2,
5,000 val images: 85.86 / 85.58 / 85.94% at 50% and 84.78 / 84.42 / 83.54% at 40%, against float32's 85.84 /
85.60 / 85.94% and 84.70 / 84.34 / 83.56%; ResNet-20 (PNG-trained) 77.80% / 73.34% against 77.78% / 73.34%;
a vgg_cifar trained anew (80.82%) 78.18% / 77.08% against 78.14% / 77.12%; that MobileNetV2 (78.38%) with
the rule kept 76.12% / 75.16% against 76.08% / 75.12% (there the rule leaves all but the stem in float32).
Running the whole step under autocast (the linear layer and the loss too) was no faster and lost ResNet-20's
last block at 40% (held-out error 0.2277 against 0.2187; 71.76% against 73.34%). ``COMPRESS_BF16=0`` turns it off.
The no-grad passes that carry each block's input (pruned network) and target (original) along follow the same
rule since the seventeenth session: on ResNet-56 at 50% FLOPs the two passes over 1,024 images took 3.6-4.3 s
against float32's 4.7-5.6 s (six alternations in one process); after the same ``lsq``, mean held-out block error
0.08117 -> 0.08116 and 86.06% -> 86.16% at 50%, 0.10915 -> 0.10916 and 85.22% -> 85.22% at 40% (5,000 val images).
The steps leave little to a closed-form fit of the last layer: after them, a ridge refit of ResNet-56's
classifier on the pruned features (held-out logit error 0.0556 -> 0.0550) moved 86.06% to 86.08% at 50% FLOPs.
Nor can a task-level loss take over where the block targets stop (seventeenth session): after ``lsq`` and
``block`` at 50% FLOPs (86.06%), Adam steps on the last stage's convolutions and the classifier (about 400k
weights) toward the original's soft predictions (KL divergence, batch 128, the 896 fitted images) overfit from
the first 50 steps (held-out KL 0.019 -> 0.025-0.074) and lost accuracy: 85.04% (lr 1e-4, 150 steps), 84.78%
(3e-4), 85.58% (1e-4, 300 steps at temperature 4), for 48-98 s. The block targets (thousands of values per
image) constrain what 896 images' ten logits cannot.
Nor does regularizing the steps help (twentieth session, ``bench/recovery.py --criterion reconstruction
--calib-sizes 1024 --recipes lsq+block``, ResNet-56, 5,000 val images, 50% / 40% FLOPs, control 86.08% /
84.78%): the average of the iterates over a block's last 50 steps, 86.00% / 84.82%; a decoupled pull of the
weights back toward their ``lsq`` values (``p -= lr_t * 20 * (p - p_lsq)`` after each step), 85.96% / 84.72%.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.nn import functional as F

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import (
    BN_TYPES,
    LAYER_TYPES,
    bf16_pays,
    bf16_supported,
    held_out_mask,
    image_cap,
    in_bf16,
    is_frozen,
    require_calib,
    spread_indices,
)
from compressor.recovery.lsq import _exec_order, _layers_to_fit, _trace_pair, refit_segment, run_node

STEPS = 100  # per block
LEARNING_RATE = 1e-3  # Adam, cosine decay; 3e-3 did worse on ResNet-56
BATCH = 64  # 128 was 0.1-0.2 points better and 1.5x slower (docstring)
INTERIOR = 6  # output positions a side that a step's crop fits, clear of its cut edges (see _crop_geometry)
PROBE = 16  # images on which a block's crop margin is measured
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


def _run_block(gm: fx.GraphModule, start: fx.Node, body: list[fx.Node], x: torch.Tensor,
               fused: dict | None = None, bf16: bool = False) -> torch.Tensor:
    """The block's output for input ``x``; nodes in ``fused`` run its function on their single input.

    ``bf16``: ungrouped convolutions with kernels wider than 1x1 run in bfloat16 (float32 in and out).
    """
    env = {start: x}
    for node in body:
        if fused is not None and node in fused:
            env[node] = fused[node](env[node.all_input_nodes[0]])
            continue
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":  # a constant defined in an earlier block
                env[arg] = run_node(gm, arg, env, x)
        env[node] = run_node(gm, node, env, x, bf16)
    return env[body[-1]]


def _fold_batchnorm(gm: fx.GraphModule, body: list[fx.Node], bf16: bool = False) -> dict:
    """Stand-ins that run each conv and the eval-mode BatchNorm right after it as one convolution.

    The conv's own weight stays the parameter (scaled per output channel inside the call), so the
    gradients are those of the unfused pair; what goes is BatchNorm's backward over the whole
    activation, over a quarter of a step's time on ResNet-56. ``bf16``: ungrouped convolutions with
    kernels wider than 1x1 run in bfloat16 (float32 in and out; see ``common.bf16_pays``).
    """
    fused: dict = {}
    inside = set(body)
    for node in body:
        users = list(node.users)
        if not (node.op == "call_module" and len(users) == 1 and users[0] in inside
                and users[0].op == "call_module" and users[0].all_input_nodes == [node] and not node.kwargs):
            continue
        conv, norm = gm.get_submodule(node.target), gm.get_submodule(users[0].target)
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not norm.training
                and norm.running_var is not None and len(node.args) == 1 and not users[0].kwargs):
            continue
        with torch.no_grad():
            scale = norm.running_var.add(norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
        fused[node] = _scaled_conv(conv, scale, shift, bf16 and bf16_pays(conv))
        fused[users[0]] = _identity
    return fused


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _scaled_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor, bf16: bool):
    def run(x: torch.Tensor) -> torch.Tensor:
        bias = shift if conv.bias is None else conv.bias * scale + shift
        weight = conv.weight * scale[:, None, None, None]
        return in_bf16(conv._conv_forward, x, weight, bias) if bf16 else conv._conv_forward(x, weight, bias)

    return run


def _run_batched(gm, start, body, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """The block's output for all of ``x``, PASS_BATCH images at a time (``bf16``: see ``_run_block``)."""
    with torch.no_grad():
        return torch.cat([_run_block(gm, start, body, x[i : i + PASS_BATCH], bf16=bf16)
                          for i in range(0, len(x), PASS_BATCH)])


def reconstruct_blocks(original: nn.Module, pruned: nn.Module, kept: dict, calib: torch.Tensor, *,
                       device: str = "cpu", steps: int | None = None, lr: float | None = None, seed: int = 0,
                       log=None, refit: bool = False, sources: torch.Tensor | None = None) -> dict:
    """Adam steps block by block on ``pruned`` (in place); returns per-block held-out errors.

    ``steps`` (per block) and ``lr`` default to STEPS and LEARNING_RATE; ``log`` receives a line per block.
    ``refit``: first refit each block's layers by least squares (``lsq``'s solve, fed the input the
    repaired upstream produces), as ``lsq_block`` does. ``sources``: each image's source image
    (``RecoveryContext.sources``); copies of a held-out image are held out with it.
    """
    steps = STEPS if steps is None else steps
    lr = LEARNING_RATE if lr is None else lr
    traced = _trace_pair(original, pruned)
    if traced is None or len(calib) < 2 * HOLDOUT_EVERY:
        return {"status": "skipped", "reason": "not fx-traceable" if traced is None else "too few images"}
    low_precision = calib.dtype == torch.float32 and bf16_supported(device)
    if log is not None and low_precision:
        log("block: ungrouped convolutions wider than 1x1 run in bfloat16 in the steps and passes (COMPRESS_BF16=0: "
            "float32)")
    gm_o, gm_p = traced
    to_orig = dict(zip(gm_p.graph.nodes, gm_o.graph.nodes, strict=True))
    index = _channel_index(gm_p, kept)
    blocks = find_blocks(gm_p)
    keep = spread_indices(len(calib), image_cap(original, calib, device))
    hold = held_out_mask(len(keep), HOLDOUT_EVERY, sources[keep] if sources is not None else None)
    calib = calib[keep].to(device)
    train = torch.nonzero(~hold).flatten()
    gen = torch.Generator().manual_seed(seed)
    original.eval()
    pruned.eval()
    flags = {p: p.requires_grad for p in pruned.parameters()}
    for p in pruned.parameters():
        p.requires_grad_(False)
    x_p = x_o = calib
    results = []
    refit_names: set[str] = set()
    if refit:
        refit_names = set(_layers_to_fit(pruned, kept, calib[:1], "downstream"))
        position = {n: i for i, n in enumerate(_exec_order(gm_p.graph))}
        lsq_gen = torch.Generator().manual_seed(seed)
    try:
        for number, (start, body) in enumerate(blocks):
            if refit_names & {n.target for n in body if n.op == "call_module"}:
                # shortcuts first, as in lsq, so a layer feeding an addition sees its other operand's error
                ordered = sorted(body[:-1], key=lambda n: position.get(n, len(position))) + [body[-1]]
                fits, y_full = refit_segment(traced, start, ordered, _channels_last(x_o), _channels_last(x_p), kept,
                                             refit_names, lsq_gen)
                y_full = y_full.contiguous()
            else:
                fits = {}
                y_full = _run_batched(gm_o, to_orig[start], [to_orig[n] for n in body], x_o, low_precision)
            out = body[-1]
            channels = index.get(out)
            y_o = y_full if channels is None else y_full[:, torch.as_tensor(channels, dtype=torch.long)]
            params = [p for n in body if n.op == "call_module"
                      and isinstance(gm_p.get_submodule(n.target), LAYER_TYPES)
                      and not is_frozen(gm_p.get_submodule(n.target))
                      for p in gm_p.get_submodule(n.target).parameters()]
            result = {"block": number, "end": out.name, "status": "kept", "least_squares": len(fits)}
            if out in index and params and y_o.shape[1:] == _run_block(gm_p, start, body, x_p[:1]).shape[1:]:
                result.update(_fit_block(gm_p, start, body, x_p, y_o, params, hold, train, gen, steps, lr,
                                         low_precision))
            results.append(result)
            if log is not None and "before" in result:
                log(f"block {number + 1}/{len(blocks)} (to {out.name}): held-out error "
                    f"{result['before']:.4f} -> {result['after']:.4f}, {result['status']}")
            x_p, x_o = _run_batched(gm_p, start, body, x_p, low_precision), y_full
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {"status": "done", "blocks": results}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout ``lsq``'s full-batch passes use (faster convolutions on a CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _crop_geometry(gm, start, body, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride, margin, crop) for steps on crop x crop crops of the block's input; None: whole images.

    ``stride``: input pixels per output pixel. ``margin``: how many output rows and columns next to a
    crop's cut edge depend on pixels beyond it. It is measured on a centred window whose edges all lie
    inside the image, two ways: the window's output positions that change, bit for bit, when every
    pixel outside the window is replaced by noise (this catches any reach, however small its effect,
    and global operators such as squeeze-excitation pooling, which leave no position clear); and those
    where running the window alone differs from the whole image (this catches operators that depend on
    the input's size). ``crop`` (input pixels) leaves INTERIOR x INTERIOR output positions clear of the
    margins: 10 pixels for a stride-1 block of two 3x3 convolutions, 56 for the stem block of a
    torchvision resnet18 at 224x224 (7x7 stride-2 conv, max pooling, two 3x3 convs).
    """
    if x.dim() != 4 or y.dim() != 4 or min(y.shape[-2:]) < 3:
        return None
    stride = x.shape[-1] // y.shape[-1]
    if stride < 1 or x.shape[-2:] != (stride * y.shape[-2], stride * y.shape[-1]):
        return None
    probe = min(y.shape[-2:]) - 2  # output pixels; one row and column of the image left out on each side
    i0, j0 = (stride * ((n - probe) // 2) for n in y.shape[-2:])
    inside = (..., slice(i0, i0 + probe * stride), slice(j0, j0 + probe * stride))
    sample = x[:PROBE]
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0)).to(sample)
    perturbed = sample + noise * (4 * float(sample.std()) + 1.0)
    perturbed[inside] = sample[inside]
    with torch.no_grad():
        part = _run_block(gm, start, body, sample[inside])
        full = _run_block(gm, start, body, sample)
        moved = _run_block(gm, start, body, perturbed)
    if part.shape[-2:] != (probe, probe):
        return None
    window = (..., slice(i0 // stride, i0 // stride + probe), slice(j0 // stride, j0 // stride + probe))
    ref = full[window]
    reached = (moved[window] != ref).flatten(0, 1).any(dim=0)
    differs = ((part - ref).abs().amax(dim=(0, 1)) > 1e-5 * float(ref.abs().max()) + 1e-12) | reached
    rows = torch.arange(probe)
    to_edge = torch.minimum(rows, probe - 1 - rows)
    edge_distance = torch.minimum(to_edge[:, None], to_edge[None, :])
    differs = differs.cpu()
    margin = int(edge_distance[differs].max()) + 1 if bool(differs.any()) else 0
    size = INTERIOR + 2 * margin
    if 2 * margin >= probe or size >= min(y.shape[-2:]):
        return None
    return stride, margin, size * stride


def _random_batch(x, y, pick, geometry, gen) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]:
    """(block input, target, output window of the target) for one step; crops when ``geometry`` is set."""
    if geometry is None:
        return x.index_select(0, pick), y.index_select(0, pick), (slice(None), slice(None))
    stride, margin, crop = geometry
    size = crop // stride
    height, width = x.shape[-2:]
    i0, j0 = (stride * int(torch.randint(0, (n - crop) // stride + 1, (1,), generator=gen)) for n in (height, width))
    # output positions next to a cut edge are left out; where the crop meets the image edge the padding is real
    top, left = (0 if i0 == 0 else margin), (0 if j0 == 0 else margin)
    bottom = size if i0 + crop == height else size - margin
    right = size if j0 + crop == width else size - margin
    oi, oj = i0 // stride, j0 // stride
    # index_select on the cropped view: about twice as fast as advanced indexing mixed with slices
    return (x[:, :, i0 : i0 + crop, j0 : j0 + crop].index_select(0, pick),
            y[:, :, oi + top : oi + bottom, oj + left : oj + right].index_select(0, pick),
            (slice(top, bottom), slice(left, right)))


class CosineAdam:
    """Adam (Kingma & Ba) whose step size decays from ``lr`` to zero along a half cosine over ``steps`` steps.

    The same updates as ``torch.optim.Adam`` stepped with ``CosineAnnealingLR(opt, steps)``; written out
    because the first ``torch.optim`` optimizer of a process imports ``torch._dynamo`` (about 2 s on a CPU).
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, params: list[torch.Tensor], lr: float, steps: int) -> None:
        self.params, self.lr, self.steps, self.done = list(params), lr, max(1, steps), 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr = self.lr * (1 + math.cos(math.pi * self.done / self.steps)) / 2
        self.done += 1
        beta1, beta2 = self.BETAS
        correction1, correction2 = 1 - beta1**self.done, 1 - beta2**self.done
        for p, (mean, square) in zip(self.params, self.moments, strict=True):
            if p.grad is None:
                continue
            mean.lerp_(p.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(mean, (square.sqrt() / math.sqrt(correction2)).add_(self.EPS), value=-lr / correction1)


def _fit_block(gm, start, body, x, y, params, hold, train, gen, steps, lr, bf16: bool = False) -> dict:
    energy = float((y**2).mean().clamp_min(1e-12))

    def held_error() -> float:
        with torch.no_grad():
            return float(F.mse_loss(_run_block(gm, start, body, x[hold]), y[hold])) / energy

    saved = [p.detach().clone() for p in params]
    before = held_error()
    geometry = _crop_geometry(gm, start, body, x[train[:PROBE]], y)
    for p in params:
        p.requires_grad_(True)
    opt = CosineAdam(params, lr, steps)
    fused = _fold_batchnorm(gm, body, bf16)
    with torch.enable_grad():
        for _ in range(steps):
            pick = train[torch.randint(0, len(train), (min(BATCH, len(train)),), generator=gen)]
            inputs, target, (rows, cols) = _random_batch(x, y, pick, geometry, gen)
            loss = F.mse_loss(_run_block(gm, start, body, inputs, fused)[..., rows, cols], target) / energy
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    after = held_error()
    accepted = after == after and after < before
    if not accepted:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return {"before": before, "after": after, "status": "refit" if accepted else "kept",
            "crop": None if geometry is None else geometry[2]}


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
                                            log=ctx.log, sources=ctx.sources)
        if self.last_info["status"] == "skipped" and ctx.log is not None:
            ctx.log(f"block: skipped ({self.last_info['reason']})")
