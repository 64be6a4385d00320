"""The ``compress`` command line: thin wrappers that build a config and call the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from compressor.budget import BUDGET_HELP
from compressor.errors import CompressorError


class DefaultToCompress(TyperGroup):
    """Treat ``compress MODEL ...`` as ``compress compress MODEL ...`` (the main command)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compress", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultToCompress,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show defaults as [value]; rich markup would swallow them
    no_args_is_help=True,
    help="Compress a trained CNN to a FLOPs or latency budget without retraining; export ONNX/TensorRT; "
    "report accuracy and latency. Main use: compress MODEL --budget 50%flops --calib DATA --out DIR.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
profiles_app = typer.Typer(help="List device profiles, or show one: compress profiles show NAME.")
app.add_typer(profiles_app, name="profiles")


def _fail(exc: Exception, debug: bool) -> None:
    if debug:
        raise exc
    if isinstance(exc, CompressorError):
        typer.echo("error: " + " ".join(str(exc).split()), err=True)
        raise typer.Exit(exc.exit_code)
    typer.echo(f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
               "rerun with --debug for the traceback and report it", err=True)
    raise typer.Exit(1)


def _recovery_choices() -> str:
    from compressor.recovery import list_recoveries
    from compressor.recovery.recipe import DATA_FREE_RECIPE, DEFAULT_RECIPE

    return (", ".join(["none", *list_recoveries()])
            + f" [{','.join(DEFAULT_RECIPE)} with calibration images (--calib or --synthesize), else "
              f"{','.join(DATA_FREE_RECIPE)}]")


def _criteria_choices() -> str:
    from compressor.criteria import list_criteria

    return ", ".join(list_criteria())


def _criterion_default() -> str:
    from compressor.config import DATA_CRITERION, DATA_CRITERION_MIN_IMAGES, DEFAULT_CRITERION

    return f"[{DATA_CRITERION} with {DATA_CRITERION_MIN_IMAGES}+ calibration images, else {DEFAULT_CRITERION}]"


@app.command("compress")
def compress_command(
    model: str = typer.Argument(..., metavar="MODEL", help="torchvision:NAME, path/file.py:CALLABLE, or model.pt "
                                "(pickled nn.Module; needs --trust-pickle). NAME and CALLABLE take literal "
                                "arguments, quoted for the shell: 'file.py:Net(depth=20)'."),
    budget: str = typer.Option(..., "--budget", "-b", help=BUDGET_HELP),
    out: Path = typer.Option(Path("runs/compressed"), "--out", "-o", help="Output folder (written atomically)."),
    weights: Path | None = typer.Option(None, help="state_dict for MODEL (loaded with weights_only=True; "
                                           "float16 is cast to the model's dtype)."),
    trust_pickle: bool = typer.Option(False, help="Allow a whole pickled model file (unpickling runs its code)."),
    calib: Path | None = typer.Option(None, help="Calibration images: folder (flat or class subfolders), "
                                         ".tar/.tar.gz, or .pt/.npy tensor NxCxHxW. Without it, see --synthesize."),
    calib_size: int | None = typer.Option(None, help="Calibration images drawn at random with --seed [1024]."),
    synthesize: int | None = typer.Option(None, help="Without --calib: synthesize this many calibration images "
                                          "from the model's BatchNorm statistics (ZeroQ/DeepInversion) and recover "
                                          "with them; 0: prune by the weights alone [128 for a model with BatchNorm "
                                          "that is small enough: about 2 minutes for ResNet-56 on 2 CPU cores]."),
    augment: bool | None = typer.Option(None, "--augment/--no-augment", help="Recover (lsq, block) on the "
                                        "calibration images plus mirrored and shifted copies, 8x at most 1,024 "
                                        "images; the criterion and the allocation see the images alone [on below "
                                        "512 images, real or synthesized: ResNet-56 with 64 kept 2.4-3.0 points "
                                        "more]; --no-augment: the images alone."),
    eval: Path | None = typer.Option(None, "--eval", help="Labelled images in class folders (label = index of "
                                        "the sorted folder name) for top-1 accuracy."),
    eval_size: int | None = typer.Option(None, help="Use at most this many evaluation images [all]."),
    eval_before_recovery: bool = typer.Option(False, help="Also report the accuracy right after pruning, "
                                              "before recovery (one more pass over the --eval images)."),
    input_shape: str | None = typer.Option(None, help="CxHxW, e.g. 3x224x224 [from the calibration data]; "
                                              "images of another size are resized."),
    mean: str | None = typer.Option(None, help="Per-channel mean after scaling to [0,1] [ImageNet's]."),
    std: str | None = typer.Option(None, help="Per-channel std [ImageNet's]."),
    criterion: str | None = typer.Option(None, help=f"Channel criterion: {_criteria_choices()} (see `compress "
                                              f"criteria`) {_criterion_default()}."),
    labels: bool = typer.Option(False, help="Let criteria use the calibration class-folder labels "
                                "(default: label-free, the model's own predictions)."),
    model_output: str = typer.Option("logits", help="What MODEL returns: logits (class scores) or features (an "
                                         "embedding or feature maps, e.g. a self-supervised backbone: criteria "
                                         "score against its own output, and the allocation and recovery measure "
                                         "the output's relative squared error; no --eval, --labels or "
                                         "--max-accuracy-drop)."),
    output_key: str | None = typer.Option(None, help="For MODEL returning a dict or a tuple: the key or position "
                                          "of the output to compress against, e.g. out for torchvision's "
                                          "segmentation models (with --model-output features) [the only tensor "
                                          "output]. The exported model returns that output alone."),
    recovery: str | None = typer.Option(None, help="Recovery recipe, comma-separated, applied in order, from: "
                                           f"{_recovery_choices()}. lsq alone is faster (ResNet-56 on a 2-core "
                                           "CPU: 15-20 s less) and repairs less (0.7-2.5 points); lsq_block "
                                           "interleaves lsq and block block by block (1-2 s faster, level on "
                                           "average, better on ResNet-56 with few images)."),
    allocation: str | None = typer.Option(None, help="Width allocation: global (one ranking over all layers), "
                                             "uniform, sensitivity (measured recoverability), criterion "
                                             "(widths the criterion proposes) [sensitivity with calibration images, "
                                             "else global]."),
    remove_branches: bool | None = typer.Option(None, "--remove-branches/--keep-branches", help="Remove the "
                                                "residual branches the width search leaves with one channel (a "
                                                "constant replaces each: fewer layers to launch; ResNet-56 at 40% "
                                                "FLOPs: 1.13-1.18x faster at batch 1 on a CPU, 0.3 points lower on "
                                                "average); under a latency budget the search counts it (ResNet-56 "
                                                "at 1.5x: 3.4 points more) [remove under latency budgets, keep "
                                                "under FLOPs budgets]."),
    ignore: list[str] = typer.Option([], help="Module-name glob never pruned (repeatable), e.g. 'features.0*'."),
    min_channels: int | None = typer.Option(None, help="Fewest channels any group keeps [1]."),
    align: bool | None = typer.Option(None, "--align/--no-align", help="Round every group's width to the "
                                         "device's channel alignment; --no-align: any width [GPU targets: every "
                                         "group; cpu: to multiples of 8 the groups of 32 or more channels where 8 "
                                         "channels move at most 5% of the MACs]."),
    device: str = typer.Option("cpu", help="cpu, cuda, or a device profile (see `compress profiles`), e.g. jetson."),
    fp16: bool = typer.Option(False, help="Measure CUDA latency in half precision."),
    batch_size: int = typer.Option(1, help="Batch size of the latency measurement."),
    warmup: int = typer.Option(10, help="Latency warm-up iterations."),
    iters: int = typer.Option(50, help="Latency timed iterations."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip the latency measurement."),
    max_accuracy_drop: float | None = typer.Option(None, help="Exit 3 when top-1 drops more than this many "
                                                      "points (needs --eval)."),
    force: bool = typer.Option(False, help="Replace a non-empty --out."),
    seed: int = typer.Option(0, help="Seed for the calibration subset and randomized criteria."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Compress MODEL to --budget and write model.onnx, model.pt2, pruning.json, report.json, report.md to --out.

    Exit codes: 0 success; 1 an error you can fix (one line says what to do); 2 usage;
    3 budget unreachable or --max-accuracy-drop exceeded. Nothing is left in --out on failure.
    """
    try:
        from compressor.config import CompressConfig
        from compressor.data import parse_floats, parse_shape
        from compressor.pipeline import run

        config = CompressConfig(
            model=model, budget=budget, out=out, weights=weights, trust_pickle=trust_pickle, calib=calib,
            calib_size=calib_size, synthesize=synthesize, augment=augment, eval=eval, eval_size=eval_size,
            eval_before_recovery=eval_before_recovery,
            input_shape=parse_shape(input_shape) if input_shape else None,
            mean=parse_floats(mean, "--mean") if mean else None, std=parse_floats(std, "--std") if std else None,
            criterion=criterion, labels=labels, model_output=model_output, output_key=output_key,
            recovery=tuple(r.strip() for r in recovery.split(",") if r.strip()) if recovery is not None else None,
            allocation=allocation, remove_branches=remove_branches, ignore=tuple(ignore), min_channels=min_channels,
            align=align, device=device,
            fp16=fp16, batch_size=batch_size, warmup=warmup, iters=iters, latency=not no_latency,
            max_accuracy_drop=max_accuracy_drop, force=force, seed=seed, progress=not quiet,
        )
        report = run(config)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure becomes one line
        _fail(exc, debug)
        return
    for line in report.summary_lines():
        typer.echo(line)
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(out).iterdir() if p.suffix != ".png")
    typer.echo(f"wrote {out}/ ({', '.join(written)})")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder."),
    budget: str = typer.Option("50%flops", help=BUDGET_HELP),
    cache: Path = typer.Option(Path.home() / ".cache" / "cnn-compressor" / "digits", help="Where the trained demo "
                               "network and its images are kept."),
    force: bool = typer.Option(True, help="Replace --out if it exists."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Train a small CNN on scikit-learn's digits (once, cached), then compress it end to end. No downloads."""
    try:
        from compressor.config import CompressConfig
        from compressor.demo import MEAN, STD, prepare
        from compressor.pipeline import run

        paths = prepare(cache, log=lambda m: typer.echo(m, err=True))
        config = CompressConfig(
            model=f"{paths['model']}:DigitsNet", weights=paths["weights"], budget=budget, out=out,
            calib=paths["calib"], eval=paths["eval"], input_shape=(1, 16, 16), mean=MEAN, std=STD, force=force,
            iters=30,
        )
        report = run(config)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        _fail(exc, debug)
        return
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(f"wrote {out}/")


@app.command("criteria")
def criteria_command() -> None:
    """List the channel criteria: name, what each needs, and its paper."""
    from compressor.criteria import CRITERIA, list_criteria

    for name in list_criteria():
        cls = CRITERIA.cls(name)
        needs = [w for w, flag in (("data", cls.needs_data), ("labels", cls.needs_labels),
                                   ("gradients", cls.needs_gradients)) if flag]
        typer.echo(f"{name:14s} {cls.description}")
        typer.echo(f"{'':14s} needs: {', '.join(needs) or 'weights only'}; paper: {cls.paper}")


@profiles_app.callback(invoke_without_command=True)
def profiles_list(ctx: typer.Context) -> None:
    """List the device profiles (data files under profiles/)."""
    if ctx.invoked_subcommand is not None:
        return
    from compressor.profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        aliases = f" (aliases: {', '.join(p.aliases)})" if p.aliases else ""
        typer.echo(f"{name:18s} {p.description}{aliases}")


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or alias.")) -> None:
    """Print one device profile."""
    from compressor.profiles import load_profile

    try:
        profile = load_profile(name)
    except CompressorError as exc:
        _fail(exc, False)
        return
    typer.echo(profile.path.read_text() if getattr(profile, "path", None) else str(profile))


@app.command("bench")
def bench_command(
    model: Path = typer.Argument(..., help="An ONNX file."),
    device: str = typer.Option("cpu", help="cpu, cuda, or a device profile (writes a benchmark bundle for it)."),
    batch_size: int = typer.Option(1, help="Batch size."),
    warmup: int = typer.Option(10, help="Warm-up iterations."),
    iters: int = typer.Option(100, help="Timed iterations."),
    out: Path | None = typer.Option(None, help="Folder for the bundle when --device is a remote profile."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Measure the latency of an existing ONNX file (onnxruntime), or write a TensorRT bundle for a device."""
    try:
        from export.benchmark import bench_onnx

        result = bench_onnx(model, device=device, batch_size=batch_size, warmup=warmup, iters=iters, out=out)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        _fail(exc, debug)
        return
    import json

    typer.echo(json.dumps(result, indent=2))


def main() -> None:  # pragma: no cover - the `compress` console entry and `python -m compressor.cli`
    """Run the CLI, then leave without tearing the interpreter down: every output is written and
    closed by then, and freeing a run's tensors and modules one by one takes about a second."""
    from compressor.allocator import keep_large_allocations

    keep_large_allocations()
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
