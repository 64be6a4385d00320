"""One compression run: model + data -> groups -> scores -> widths -> pruned -> recovered -> artifacts."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compressor import budget as budget_mod
from compressor import evaluate, output_select, widths
from compressor import graph as graph_mod
from compressor.config import DEFAULT_CALIB_SIZE, CompressConfig
from compressor.criteria import ScoringContext, get_criterion
from compressor.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, load_images
from compressor.errors import BudgetError, CompressorError
from compressor.model_io import count_params, first_conv_in_channels, load_model
from compressor.report import Report, ratio_block, versions

SOUNDNESS_TOLERANCE = 1e-4  # relative to the output's magnitude
ONNX_TOLERANCE = 1e-4


class Stages:
    """Times named stages and prints one progress line per stage to stderr."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        if self.show:
            print(f"[{time.perf_counter() - self._start:6.1f}s] {message}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def note(self, message: str) -> None:
        if self.show:
            print(f"         {message}", file=sys.stderr, flush=True)

    def total(self) -> float:
        return time.perf_counter() - self._start


def accuracy(model: nn.Module, data: ImageSet, used: set[str] | None = None, onnx_path: Path | None = None) -> float:
    """Top-1 accuracy on labelled data; the backend that ran it is added to ``used``."""
    value, backend = evaluate.accuracy(model, data.images, data.labels, onnx_path=onnx_path)
    if used is not None:
        used.add(backend)
    return value


def prepare_output(out: Path, force: bool) -> Path:
    """Check ``out`` can be written; return a fresh temporary folder beside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"--out {str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CompressorError(
            f"--out {str(out)!r} exists and is not empty; pass --force to replace it or choose another folder"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CompressorError(f"cannot write to --out {str(out)!r} ({exc.strerror}); choose a writable folder") from exc


def finalize_output(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder into place (replacing ``out`` with --force)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _check_model_accepts(model: nn.Module, example: torch.Tensor, output_kind: str = "logits",
                         output_key: str | None = None, stages: Stages | None = None
                         ) -> tuple[nn.Module, torch.Tensor]:
    """The model to compress and its output on ``example``: one N x classes tensor, or for
    ``output_kind="features"`` one tensor of N x D features or N x C x H x W feature maps (a dense backbone).

    A model returning a dict or a tuple is made to return the entry ``output_key`` names (the only tensor
    entry when there is one and no key is given), without the layers that feed only the other entries
    (``output_select``).
    """
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:
        raise CompressorError(
            f"the model rejects input of shape {tuple(example.shape[1:])} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160]}); pass the right --input-shape CxHxW"
        ) from exc
    key = output_select.choose_key(output, output_key)
    if key is not None:
        if output_key is None and stages is not None:
            stages.note(f"the model returns {output_select.describe(output)}: compressing against {key!r}")
        output = output[key]
        model, unused = output_select.select_output(model, key, example, output)
        if unused and stages is not None:
            stages.note(f"{len(unused)} layer(s) feed only the other outputs and are left out ({unused[0]}, ...)")
    if output_kind == "features" and isinstance(output, torch.Tensor) and output.ndim >= 2:
        return model, output
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        hint = "" if output_kind == "features" else " with --model-output features"
        raise CompressorError(
            "the model must return one N x classes tensor (classification), or features (N x D or N x C x H x W)"
            f"{hint}; it returned {output_select.describe(output)}"
        )
    return model, output


def _check_classes(data: ImageSet | None, outputs: int, option: str, stages: Stages) -> None:
    """Labels are class-folder indices in sorted order: they must fit the model's outputs.

    Fewer folders than outputs can be right (a subset of the classes, named to sort in the model's
    order), so it is noted rather than refused.
    """
    if data is None or data.labels is None or not data.classes:
        return
    folders = len(data.classes)
    if folders > outputs:
        raise CompressorError(
            f"{option} has {folders} class folders but the model has {outputs} outputs; pass data with one folder "
            "per class of the model, named so that they sort in the model's class order"
        )
    if folders < outputs:
        stages.note(f"{option} has {folders} class folders for {outputs} model outputs: label i is the i-th folder "
                    f"in sorted order ({data.classes[0]!r}, ...), so they must be the model's first {folders} classes")


def _augmented(images: torch.Tensor, seed: int, forced: bool,
               stages: Stages) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` and mirrored and shifted copies (``augment.augmented_count``), and each one's source index."""
    from compressor.augment import AUGMENT_TO, augmented_count, expand

    n = len(images)
    count = augmented_count(n, forced)
    if count <= n:
        if forced:
            stages.note(f"--augment: {n} calibration images, {AUGMENT_TO} or more: no copies added")
        return images, None
    with stages.stage("augment", f"adding {count - n} mirrored and shifted copies of the {n} calibration images "
                                 "for the recovery (--no-augment: none)"):
        images, sources = expand(images, count, seed)
    return images, sources


def _synthesized_calibration(config: CompressConfig, model: nn.Module, input_shape: tuple, classes: int,
                             stages: Stages) -> ImageSet | None:
    """Without --calib: images synthesized from the model's BatchNorm statistics, or None (weights only)."""
    from compressor import synthesize

    device = str(graph_mod.device_of(model))
    count = config.synthesize
    if count == 0:
        return None
    if count is None:
        macs, _ = graph_mod.count_macs_params(model, torch.zeros(1, *input_shape, device=device))
        count, why = synthesize.default_count(model, macs, device)
        if not count:
            hint = " or --synthesize 128 to synthesize images anyway" if synthesize.has_batchnorm(model) else ""
            stages.note(f"no --calib: pruning by the weights alone ({why}); pass --calib DIR{hint}")
            return None
    elif not synthesize.has_batchnorm(model):
        raise CompressorError("--synthesize needs a model with BatchNorm2d layers (their statistics stand in for "
                              "data); pass --calib DIR or --synthesize 0")
    with stages.stage("synthesize", f"synthesizing {count} calibration images from the model's BatchNorm "
                                    "statistics (no --calib; --synthesize 0 skips this)"):
        try:
            images = synthesize.synthesize(model, tuple(input_shape), count, classes=classes, seed=config.seed,
                                           device=device, log=stages.note)
        except Exception as exc:  # noqa: BLE001 - any failure of the model under autograd
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            if config.synthesize is not None:  # asked for: say so
                raise CompressorError(f"--synthesize failed ({type(exc).__name__}: {first}); pass --calib DIR "
                                      "or --synthesize 0") from exc
            stages.note(f"no --calib and the synthesis failed ({type(exc).__name__}: {first}): pruning by the "
                        "weights alone; pass --calib DIR")
            return None
    return ImageSet(images, None)


def load_inputs(config: CompressConfig, stages: Stages) -> tuple[nn.Module, ImageSet | None, ImageSet | None, tuple]:
    """Load the model, calibration and evaluation data and settle the input shape."""
    with stages.stage("load_model", f"loading model {config.model}"):
        model = load_model(config.model, config.weights, config.trust_pickle)
    mean = config.mean or IMAGENET_MEAN
    std = config.std or IMAGENET_STD
    calib = None
    if config.calib is not None:
        with stages.stage("load_data", f"reading calibration data {config.calib}"):
            calib = load_images(
                config.calib, limit=config.calib_size or DEFAULT_CALIB_SIZE, seed=config.seed,
                input_shape=config.input_shape, mean=mean, std=std, progress=config.progress,
                labelled=config.labels,
            )
    input_shape = config.input_shape or (tuple(calib.images.shape[1:]) if calib is not None else None)
    if input_shape is None:
        raise CompressorError("without --calib the input shape is unknown; pass --input-shape CxHxW (e.g. 3x224x224)")
    expected = first_conv_in_channels(model)
    if expected is not None and expected != input_shape[0]:
        raise CompressorError(
            f"the model's first convolution takes {expected} channels but the data has {input_shape[0]}; "
            "convert the images or pass the matching model"
        )
    evaluation = None
    if config.eval is not None:
        with stages.stage("load_data", f"reading evaluation data {config.eval}"):
            evaluation = load_images(
                config.eval, limit=config.eval_size, seed=config.seed, input_shape=input_shape, mean=mean,
                std=std, labelled=True, progress=config.progress, what="evaluation",
            )
    return model, calib, evaluation, tuple(input_shape)


def run(config: CompressConfig) -> Report:
    """Compress ``config.model`` to ``config.budget`` and write the artifacts to ``config.out``.

    Nothing is left in ``config.out`` when this raises.
    """
    budget = budget_mod.parse_budget(config.budget)
    stages = Stages(config.progress)
    torch.manual_seed(config.seed)
    tmp = prepare_output(config.out, config.force)
    try:
        report = _run(config, budget, stages, tmp)
        finalize_output(tmp, Path(config.out))
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(config: CompressConfig, budget: budget_mod.Budget, stages: Stages, tmp: Path) -> Report:
    from compressor import deploy

    target = deploy.resolve_target(config.device, config.align)  # a mistyped --device fails before any reading
    model, calib, evaluation, input_shape = load_inputs(config, stages)
    example = calib.images[:1] if calib is not None else torch.randn(1, *input_shape)
    model, output = _check_model_accepts(model, example, config.output_kind, config.output_key, stages)
    synthesized = False
    if calib is None:
        # a feature output has no classes for the synthesis's class term to pull toward (0: none)
        classes = output.shape[1] if config.output_kind == "logits" else 0
        calib = _synthesized_calibration(config, model, input_shape, classes, stages)
        synthesized = calib is not None
        if synthesized:
            example = calib.images[:1]
    for data, option in ((evaluation, "--eval"), (calib if config.labels else None, "--calib (with --labels)")):
        _check_classes(data, output.shape[1], option, stages)
    calib_count = len(calib.images) if calib is not None else 0
    criterion = get_criterion(config.criterion_for(calib_count))
    if criterion.needs_data and calib is None:
        raise CompressorError(f"criterion {criterion.name!r} needs calibration data; pass --calib or choose l1")
    recovery_images, sources = (calib.images if calib is not None else None), None
    if calib is not None and config.augment is not False:
        recovery_images, sources = _augmented(calib.images, config.seed, bool(config.augment), stages)
    with stages.stage("graph", "building the channel dependency graph"):
        graph = graph_mod.build_graph(
            model, example, ignore=config.ignore, min_channels=config.min_channels or 1,
            round_to=target.alignment, round_min_channels=target.align_min_channels,
        )
        deploy.relax_coarse_alignment(graph, target)
    original = graph.model
    for g in graph.excluded:
        stages.note(f"left unpruned: {g.root} ({g.size} channels): {g.reason}")
    macs0, params0 = graph_mod.count_macs_params(original, example)
    soundness_inputs = (calib.images if calib is not None else torch.randn(8, *input_shape))[:16]

    acc = {}
    eval_backends: set[str] = set()
    original_onnx = None  # its export serves the evaluation, the latency search and comparison; removed at the end
    if evaluation is not None or config.latency or budget.kind != "flops":
        # first, so that a model no ONNX file can represent stops here, not after the pruning and recovery
        with stages.stage("export_original", "exporting the original model to ONNX"):
            original_onnx = _export_or_none(original, example, tmp / ".work" / "original.onnx")
    if evaluation is not None:
        with stages.stage("evaluate", "measuring the original model's accuracy"):
            acc["original"] = accuracy(original, evaluation, eval_backends, original_onnx)
    with stages.stage("score", f"scoring channels with {criterion.name}"):
        ctx = ScoringContext(
            model=original, groups=graph.groups, calib=calib.images if calib is not None else None,
            labels=calib.labels if (calib is not None and config.labels) else None, seed=config.seed,
            output=config.output_kind,
        )
        scores = criterion.score(ctx)
    with stages.stage("search", f"searching widths for {budget.text}"):
        counts, candidates = deploy.search(config, budget, target, graph, scores, criterion, ctx, calib, stages,
                                           original_onnx=original_onnx)
    plan = widths.make_plan(graph, scores, counts)
    with stages.stage("prune", "removing channels"):
        pruned = graph_mod.apply_plan(graph, plan)
        plan = pruned.plan
        macs1, params1 = graph_mod.count_macs_params(pruned.model, example)
    if budget.kind == "flops" and macs1 > budget.target * macs0 * (1 + 1e-9):
        raise BudgetError(f"the pruned model keeps {macs1 / macs0:.1%} of the FLOPs, above the budget {budget.text}")
    with stages.stage("soundness", "checking the pruned model against the masked original"):
        diff = graph_mod.soundness_diff(graph, plan, pruned.model, soundness_inputs)
        scale = float(evaluate.predict(original, soundness_inputs).abs().max())
        if not diff <= SOUNDNESS_TOLERANCE * max(1.0, scale):
            raise CompressorError(
                f"soundness check failed: pruned model differs from the masked original by {diff:.3g}; "
                "report this model; --ignore the layers around the offending op to work around it"
            )
    if evaluation is not None and config.eval_before_recovery:
        with stages.stage("evaluate", "measuring accuracy before recovery"):
            acc["before_recovery"] = accuracy(pruned.model, evaluation, eval_backends)
    branches, removable = _silence_branches(config.removes_branches(budget.kind), graph, pruned, recovery_images,
                                            stages)
    from compressor.recovery.recipe import DATA_FREE_RECIPE, DEFAULT_RECIPE, run_recipe

    recipe = config.recovery_recipe
    if recipe is None:
        recipe = tuple(DEFAULT_RECIPE if calib is not None else DATA_FREE_RECIPE)
    recovery_info = {}
    if recipe:
        with stages.stage("recover", f"recovering accuracy: {' + '.join(recipe)}"):
            from compressor.recovery import RecoveryContext

            rctx = RecoveryContext(
                original=original, pruned=pruned.model, groups=graph.groups, plan=plan, kept=pruned.kept,
                calib=recovery_images, sources=sources, log=stages.note, output=config.output_kind,
            )
            recovery_info = run_recipe(list(recipe), rctx)
            if recovery_info.get("reverted"):
                stages.note("recovery left the held-out calibration images further from the original: undone")
    recovered = pruned.model.eval()
    if branches:
        from compressor.graph.branches import fold_checked

        recovered, folded = fold_checked(recovered, branches, soundness_inputs, SOUNDNESS_TOLERANCE)
        if not folded:
            stages.note("the silenced branches could not be folded into constants: their layers stay in the model")
            branches = []
        macs1, params1 = graph_mod.count_macs_params(recovered, example)
    with stages.stage("export", "exporting ONNX and checking it in onnxruntime"):
        export_info = deploy.export_all(recovered, example, soundness_inputs, tmp, target, input_shape,
                                        config.batch_size)
        try:
            export_info["pytorch"] = {"file": save_pytorch(recovered, example, tmp)}
        except CompressorError as exc:  # model.onnx, the deployment artifact, is complete: go on without it
            export_info["pytorch"] = {"file": None, "error": str(exc)}
            stages.note(f"model.pt2 not written: {exc}")
        (tmp / "pruning.json").write_text(json.dumps(pruning_record(config, graph, plan, pruned.kept, branches),
                                                     indent=1))
    if evaluation is not None:
        with stages.stage("evaluate", "measuring accuracy after recovery"):
            acc["pruned"] = accuracy(recovered, evaluation, eval_backends, tmp / "model.onnx")
        drop = 100 * (acc["original"] - acc["pruned"])
        if config.max_accuracy_drop is not None and drop > config.max_accuracy_drop:
            raise BudgetError(
                f"accuracy dropped {drop:.2f} points ({acc['original']:.2%} -> {acc['pruned']:.2%}), "
                f"more than --max-accuracy-drop {config.max_accuracy_drop}; relax the budget or try another criterion"
            )
    latency_info = {}
    if config.latency:
        with stages.stage("latency", f"measuring latency on {target.name}"):
            latency_info = deploy.latency(config, target, original, recovered, example, tmp, input_shape,
                                          onnx_files=(original_onnx, tmp / "model.onnx"))
    shutil.rmtree(tmp / ".work", ignore_errors=True)
    removed = {b.group for b in branches}
    report = Report({
        "model": config.model,
        "model_output": config.output_kind,
        "budget": budget_report(budget, macs1 / macs0, candidates),
        "criterion": criterion.name,
        "allocation": config.allocation_for(calib is not None),
        "recovery": list(recipe),
        "recovery_steps": recovery_info,
        "flops": ratio_block(2 * macs0, 2 * macs1),
        "macs": ratio_block(macs0, macs1),
        "params": ratio_block(params0 or count_params(original), params1),
        "soundness": {
            "max_abs_diff": diff,
            "excluded_groups": [{"root": g.root, "size": g.size, "reason": g.reason} for g in graph.excluded],
        },
        "export": export_info,
        "input_shape": list(input_shape),
        "calibration_images": calib_count,
        "calibration_augmented": len(recovery_images) - calib_count if recovery_images is not None else 0,
        "calibration_source": "synthesized" if synthesized else ("data" if calib is not None else "none"),
        "layers": [{"root": g.root, "kept": 0 if g.id in removed else int(counts.get(g.id, g.size)), "size": g.size}
                   for g in graph.groups if g.prunable],
        "removed_branches": [{"root": b.root, "layers": b.producers + b.consumers} for b in branches],
        "removable_branches": removable,
        "candidates": candidates,
    })
    if acc:
        report.data["accuracy"] = {**acc, "backend": " + ".join(sorted(eval_backends))}
    report.data.update(latency_info)
    if latency_info and budget.kind != "flops" and not latency_info["latency"].get("estimate"):
        report.data["budget"].update(final_budget_check(budget, latency_info["latency"]))
    report.data["plots"] = deploy.plots(report.data, tmp)
    timings = {k: round(v, 3) for k, v in stages.timings.items()}
    report.data["timings_s"] = {**timings, "total": round(stages.total(), 3)}
    report.data["versions"] = versions()
    report.write(tmp)
    del output
    return report


def _export_or_none(model: nn.Module, example: torch.Tensor, path: Path) -> Path | None:
    """``model`` exported to ONNX at ``path``, or None when it does not export (callers then use the module).

    Raises:
        DataDependentControlFlow: the model branches on tensor values; no compressed ONNX file could be
            written either.
    """
    from export.onnx import DataDependentControlFlow, export_onnx

    try:
        return export_onnx(model, example, path)
    except DataDependentControlFlow:
        raise
    except CompressorError:
        return None


def budget_report(budget: budget_mod.Budget, flops_ratio: float, candidates: list[dict]) -> dict:
    """The ``budget`` block: what was asked and what was achieved (measured, for latency budgets)."""
    block = {"kind": budget.kind, "target": budget.target, "text": budget.text, "achieved_flops_ratio": flops_ratio}
    chosen = [c for c in candidates if c.get("chosen")]
    if chosen:
        block.update(target_ms=chosen[0]["target_ms"], achieved_ms=chosen[0]["latency_ms"],
                     original_ms=chosen[0]["original_ms"])
    return block


def final_budget_check(budget: budget_mod.Budget, lat: dict) -> dict:
    """Whether the report's own latency measurement meets a latency or speed-up budget.

    The search chose the widest candidate it measured within the budget; the report times the
    result again, in alternation with the original, and on a shared machine that can land on the
    other side of the line. ``measured`` is the speed-up factor (``Nx``) or the pruned p50 in ms.
    """
    if budget.kind == "speedup":
        measured = float(lat["speedup"])
        return {"met": measured >= budget.target, "measured": measured}
    measured = float(lat["pruned_ms"]["p50"])
    return {"met": measured <= budget.target, "measured": measured}


def save_pytorch(model: nn.Module, example: torch.Tensor, folder: Path) -> str:
    """Save the pruned model so that it loads without the user's code.

    ``model.pt2`` is a ``torch.export`` program (``torch.export.load``), with a dynamic batch.

    Raises:
        CompressorError: ``torch.export`` cannot capture the model (its own printout is discarded).
    """
    from export.onnx import quiet_exporters

    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with quiet_exporters():
            program = torch.export.export(model.eval(), (example.repeat(2, 1, 1, 1),), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CompressorError(
            f"torch.export cannot capture the pruned model ({type(exc).__name__}: {first[:200]})"
        ) from exc
    torch.export.save(program, folder / "model.pt2")
    return "model.pt2"


def pruning_record(config: CompressConfig, graph, plan, kept, branches=()) -> dict:
    """Replayable record: the kept channel indices per group and per layer, and the removed branches
    (their groups keep one channel in ``groups``; ``removed_branches`` lists the layers a constant replaced)."""
    return {
        "model": config.model,
        "groups": [
            {"id": g.id, "root": g.root, "size": g.size, "prunable": g.prunable,
             "kept": plan[g.id].tolist() if g.id in plan else list(range(g.size))}
            for g in graph.groups
        ],
        "layers": kept,
        "removed_branches": [{"group": b.group, "root": b.root, "layers": b.producers + b.consumers}
                             for b in branches],
    }


def _silence_branches(remove: bool, graph, pruned, calib: torch.Tensor | None,
                      stages: Stages) -> tuple[list, int]:
    """When ``remove``, silence the residual branches the width search left with one channel
    (``graph.branches``); the recovery then repairs the network for their absence. Returns the silenced
    branches and how many could be removed."""
    from compressor.graph.branches import branch_means, find_removable, silence

    branches = find_removable(pruned.model, graph.groups, pruned.plan)
    if not branches or not remove:
        return [], len(branches)
    with stages.stage("prune", f"removing {len(branches)} residual branch(es) left with one channel"):
        silence(pruned.model, branches, pruned.kept, branch_means(graph.model, branches, calib))
        stages.note(", ".join(b.root for b in branches))
    return branches, len(branches)


__all__ = ["run", "accuracy"]
