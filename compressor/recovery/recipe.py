"""Composable recovery recipes: apply methods in order, time them, and measure label-free fidelity."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.recovery import get_recovery
from compressor.recovery.base import RecoveryContext
from compressor.recovery.common import batches

# Chosen by measurement (bench/results/recovery.md, whole_run.md). ``lsq`` first: least squares
# alone ties BatchNorm re-estimation followed by least squares (cells within -0.55 to +0.52 points,
# no sign either way) and skips a pass over the images; the reconstruction maps its targets through
# the BNs, whose statistics it leaves as they are, so re-estimating them after it would undo part of
# the fit. Then ``block``: with 256 or more images it added 0.2 to 3.2 points to ``lsq`` on
# ResNet-56, ResNet-20 and vgg_cifar (ResNet-56 at 1,024 images: 84.4% -> 85.8% at 50% FLOPs,
# 81.9% -> 84.1% at 40%; 0.1-0.5 on resnet18 and mobilenet_v2), for 15-20 s more on ResNet-56 on a
# 2-core CPU; ``--recovery lsq`` is the faster choice. It is kept with few images too: ResNet-56 with
# 32 images (``l1``, the criterion there) went 78.1% -> 79.6% at 50% FLOPs and 72.6% -> 74.2% at 40%.
DEFAULT_RECIPE: list[str] = ["lsq", "block"]
DATA_FREE_RECIPE: list[str] = ["datafree"]
HOLDOUT_MAX = 128  # images held out of the calibration set to measure fidelity
HOLDOUT_MIN_CALIB = 256  # below this the fidelity is measured on the calibration images themselves


@torch.no_grad()
def fidelity(original: torch.nn.Module, pruned: torch.nn.Module, images: torch.Tensor, batch_size: int = 128,
             device: str = "cpu", output: str = "logits") -> dict[str, float]:
    """Label-free agreement of ``pruned`` with ``original``.

    Class outputs: top-1 agreement and mean KL(orig || pruned), keys ``top1_agreement`` and ``kl``. Feature
    outputs (``output="features"``, an embedding): mean cosine similarity and the squared error relative to
    the original output's energy, ``sum ||p - o||^2 / sum ||o||^2``, keys ``cosine`` and ``distortion``.
    """
    if output == "features":
        return _feature_fidelity(original, pruned, images, batch_size, device)
    agree, kl, n = 0, 0.0, 0
    original.eval()
    pruned.eval()
    for x in batches(images, batch_size, device):
        lo, lp = original(x).float(), pruned(x).float()
        if lo.dim() != 2:
            lo, lp = lo.flatten(1), lp.flatten(1)
        agree += int((lo.argmax(1) == lp.argmax(1)).sum())
        kl += float(F.kl_div(F.log_softmax(lp, 1), F.log_softmax(lo, 1), log_target=True, reduction="sum"))
        n += len(x)
    # a KL divergence is never negative; rounding makes it so by about 1e-8 when the two models agree
    return {"top1_agreement": agree / max(1, n), "kl": max(0.0, kl / max(1, n))}


@torch.no_grad()
def _feature_fidelity(original, pruned, images, batch_size, device) -> dict[str, float]:
    cosine, error, energy, n = 0.0, 0.0, 0.0, 0
    original.eval()
    pruned.eval()
    for x in batches(images, batch_size, device):
        lo, lp = original(x).double().flatten(1), pruned(x).double().flatten(1)  # float32 cosines of long
        # outputs (a segmentation map) come out above 1
        cosine += float(F.cosine_similarity(lp, lo, dim=1, eps=1e-12).sum())
        error += float((lp - lo).pow(2).sum())
        energy += float(lo.pow(2).sum())
        n += len(x)
    return {"cosine": cosine / max(1, n), "distortion": error / max(energy, 1e-30)}


def distance_key(measure: dict[str, float]) -> str:
    """The key of :func:`fidelity`'s distance from the original (lower is better): ``kl`` or ``distortion``."""
    return "kl" if "kl" in measure else "distortion"


def describe_fidelity(before: dict[str, float], after: dict[str, float]) -> str:
    """``before -> after`` of :func:`fidelity`'s two measures, in words."""
    if "kl" in before:
        return (f"KL divergence from the original {before['kl']:.3f} -> {after['kl']:.3f}, top-1 agreement "
                f"{before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}")
    return (f"relative squared error of the output {before['distortion']:.4f} -> {after['distortion']:.4f}, "
            f"cosine similarity {before['cosine']:.4f} -> {after['cosine']:.4f}")


def run_recipe(names: list[str], ctx: RecoveryContext, *, measure: bool = True) -> dict:
    """Apply the recovery methods ``names`` in order to ``ctx.pruned``.

    With ``measure`` and calibration data, up to HOLDOUT_MAX images (when there are at least
    HOLDOUT_MIN_CALIB, copies not counted) are held out of the methods, with their copies
    (``ctx.sources``), and used to report the pruned model's top-1 agreement with the original
    and the KL divergence, before and after; with fewer, these are measured on the images
    themselves (not their copies).

    When the held-out images end further from the original (KL divergence; for feature outputs the relative
    squared error) than before the recipe,
    the recipe is undone: ``ctx.pruned`` gets its weights from before, and ``"reverted": True``.

    Returns {"recipe": names, "steps": [{"name", "seconds"}], "seconds": total,
    "fidelity": {"before": {...}, "after": {...}, "images": n, "held_out": bool}} (fidelity
    only when measured).
    """
    names = [n for n in names if n and n != "none"]
    methods = [get_recovery(n) for n in names]
    for method in methods:
        if method.needs_data and ctx.calib is None:
            raise CompressorError(
                f"recovery method {method.name!r} needs calibration images; pass --calib or use the data-free "
                f"recipe ({' + '.join(DATA_FREE_RECIPE)})"
            )
    run_ctx, probe, held_out = ctx, None, False
    if measure and ctx.calib is not None and len(ctx.calib) > 1:
        n = len(ctx.calib)
        sources = ctx.sources if ctx.sources is not None else torch.arange(n)
        own = sources == torch.arange(n)  # the images themselves, not copies (compressor.augment)
        count = int(own.sum())
        if count >= HOLDOUT_MIN_CALIB:
            # a strided slice of the source images (calibration sets are often stored class by class), held
            # out with all their copies
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[torch.nonzero(own).flatten()[torch.linspace(0, count - 1, min(HOLDOUT_MAX, count // 8))
                                                .round().long()]] = True
            mask = chosen[sources]
            probe, held_out = ctx.calib[mask & own], True
            run_ctx = dataclasses.replace(ctx, calib=ctx.calib[~mask], sources=sources[~mask])
        else:
            probe = ctx.calib[own]
    result: dict = {"recipe": names, "steps": []}
    before = (fidelity(ctx.original, ctx.pruned, probe, ctx.batch_size, ctx.device, ctx.output)
              if probe is not None else None)
    backup = copy.deepcopy(ctx.pruned) if held_out else None
    start = time.perf_counter()
    log = ctx.log or (lambda _message: None)
    for number, method in enumerate(methods, start=1):
        log(f"{method.name} ({number} of {len(methods)}): running")  # some run for minutes without other output
        t0 = time.perf_counter()
        method.apply(run_ctx)
        ctx.pruned.eval()
        result["steps"].append({"name": method.name, "seconds": time.perf_counter() - t0})
        log(f"{method.name}: done in {result['steps'][-1]['seconds']:.1f} s")
    result["seconds"] = time.perf_counter() - start
    if probe is not None:
        after = fidelity(ctx.original, ctx.pruned, probe, ctx.batch_size, ctx.device, ctx.output)
        result["fidelity"] = {"before": before, "after": after, "images": len(probe), "held_out": held_out}
        log(f"{'held-out' if held_out else 'calibration'} images ({len(probe)}): {describe_fidelity(before, after)}")
        key = distance_key(before)
        if backup is not None and not after[key] <= before[key]:
            # each method accepts its own changes on held-out data, layer by layer or block by block; should the
            # whole recipe still leave the held-out images further from the original, it is undone
            _restore(ctx.pruned, backup)
            result["reverted"] = True
            result["fidelity"]["after"] = before
    return result


def _restore(model: torch.nn.Module, backup: torch.nn.Module) -> None:
    """Give ``model`` (in place: callers hold it) the parameters and buffers of ``backup``, its copy from before.

    Whole parameter tables are swapped because a method may have added parameters (``lsq`` adds biases).
    """
    for module, saved in zip(model.modules(), backup.modules(), strict=True):
        module._parameters = saved._parameters
        module._buffers = saved._buffers
