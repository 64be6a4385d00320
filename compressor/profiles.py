"""Device profiles: one TOML data file per target under ``profiles/`` at the repository root.

A profile holds the vendor figures the roofline latency estimate needs (dense peak FP16/INT8
throughput, memory bandwidth), the channel multiples tensor cores prefer, and how the model
is deployed there (TensorRT, default precision). ``load_profile`` accepts a name or an alias.

The folder is looked up, in order: ``$COMPRESSOR_PROFILES``, ``profiles/`` beside the
``compressor`` package (repository checkout), ``compressor/profiles/`` (installed package data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from compressor.errors import CompressorError

KINDS = ("gpu", "cpu", "jetson")
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED = (
    "name", "description", "kind", "aliases", "peak_fp16_tflops", "peak_int8_tops", "memory_bandwidth_gbs",
    "compute_capability", "channel_alignment_fp16", "channel_alignment_int8", "default_precision", "tensorrt",
    "dla_cores", "sources",
)
OPTIONAL = {"peak_figures": "", "kernel_launch_us": 5.0, "estimate_notes": ""}


@dataclass(frozen=True)
class DeviceProfile:
    """One target device.

    Attributes:
        name: Canonical name (the file stem).
        description: One line for ``compress profiles``.
        kind: ``gpu``, ``cpu`` or ``jetson``.
        aliases: Other names ``--device`` accepts.
        peak_fp16_tflops, peak_int8_tops: Dense (no structured sparsity) peak throughput; 0 = unsupported.
        memory_bandwidth_gbs: DRAM bandwidth in GB/s.
        compute_capability: CUDA compute capability (``"8.7"``), ``"none"`` for CPUs.
        channel_alignment_fp16, channel_alignment_int8: Channel multiple tensor cores prefer.
        default_precision: ``fp32``, ``fp16`` or ``int8``.
        tensorrt: Whether the device is deployed with TensorRT.
        dla_cores: Number of deep-learning accelerators (Jetson).
        sources: Data-sheet citations, each ``{"title": ..., "url": ...}``.
        peak_figures: How the peak figures were obtained (dense vs sparse, derivations).
        kernel_launch_us: Per-layer overhead used by the roofline estimate (not a vendor figure).
        estimate_notes: Caveats on the estimate figures.
        path: The TOML file the profile was read from.
    """

    name: str
    description: str
    kind: str
    aliases: tuple[str, ...]
    peak_fp16_tflops: float
    peak_int8_tops: float
    memory_bandwidth_gbs: float
    compute_capability: str
    channel_alignment_fp16: int
    channel_alignment_int8: int
    default_precision: str
    tensorrt: bool
    dla_cores: int
    sources: tuple[dict, ...] = ()
    peak_figures: str = ""
    kernel_launch_us: float = 5.0
    estimate_notes: str = ""
    path: Path | None = field(default=None, compare=False)

    def alignment(self, precision: str | None = None) -> int:
        """Channel multiple for ``precision`` (default: the profile's default precision)."""
        precision = precision or self.default_precision
        return self.channel_alignment_int8 if precision == "int8" else self.channel_alignment_fp16

    def peak_ops_per_s(self, precision: str | None = None) -> float:
        """Peak arithmetic throughput in operations per second (FLOP/s or OP/s) for ``precision``.

        INT8 on a device without INT8 support (``peak_int8_tops == 0``) falls back to FP16;
        FP32 is taken as half the FP16 rate on GPUs (tensor-core TF32 or CUDA cores) and equal on CPUs.
        """
        precision = precision or self.default_precision
        if precision == "int8" and self.peak_int8_tops > 0:
            return self.peak_int8_tops * 1e12
        fp16 = self.peak_fp16_tflops * 1e12
        if precision == "fp32" and self.kind != "cpu":
            return fp16 / 2
        return fp16


def profiles_dir() -> Path:
    """The folder holding the profile TOML files."""
    env = os.environ.get("COMPRESSOR_PROFILES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "profiles", here / "profiles"):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    return here.parent / "profiles"


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.toml"))


def list_profiles() -> list[str]:
    """Canonical profile names (file stems), sorted."""
    return [p.stem for p in _files(profiles_dir())]


def _bad(path: Path, key: str, value, expected: str) -> CompressorError:
    return CompressorError(f"profile {path}: {key} = {value!r} is invalid; expected {expected}")


def _number(path: Path, data: dict, key: str, minimum: float = 0.0, positive: bool = False) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, key, value, "a number")
    if value < minimum or (positive and value <= 0):
        raise _bad(path, key, value, "a positive number" if positive else f"a number >= {minimum}")
    return float(value)


def _alignment(path: Path, data: dict, key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise _bad(path, key, value, "a power of two >= 1 (e.g. 8 or 16)")
    return value


def parse_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile file; errors quote the file, the key and the bad value."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CompressorError(f"profile {path}: cannot be read as TOML: {exc}") from exc
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CompressorError(f"profile {path}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise CompressorError(f"profile {path}: unknown field(s) {', '.join(unknown)}; known: "
                              f"{', '.join(REQUIRED + tuple(OPTIONAL))}")
    for key in ("name", "description", "compute_capability"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _bad(path, key, data[key], "a non-empty string")
    if data["name"] != path.stem:
        raise _bad(path, "name", data["name"], f"the file name {path.stem!r}")
    if data["kind"] not in KINDS:
        raise _bad(path, "kind", data["kind"], " or ".join(repr(k) for k in KINDS))
    if data["default_precision"] not in PRECISIONS:
        raise _bad(path, "default_precision", data["default_precision"], " or ".join(repr(p) for p in PRECISIONS))
    aliases = data["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise _bad(path, "aliases", aliases, "a list of non-empty strings")
    if not isinstance(data["tensorrt"], bool):
        raise _bad(path, "tensorrt", data["tensorrt"], "true or false")
    dla = data["dla_cores"]
    if isinstance(dla, bool) or not isinstance(dla, int) or dla < 0:
        raise _bad(path, "dla_cores", dla, "an integer >= 0")
    fp16 = _number(path, data, "peak_fp16_tflops", positive=True)
    int8 = _number(path, data, "peak_int8_tops")
    bandwidth = _number(path, data, "memory_bandwidth_gbs", positive=True)
    launch = _number(path, {**OPTIONAL, **data}, "kernel_launch_us")
    if data["default_precision"] == "int8" and int8 <= 0:
        raise _bad(path, "default_precision", "int8", "fp16 or fp32: peak_int8_tops is 0 (INT8 unsupported)")
    cc = data["compute_capability"]
    if data["kind"] != "cpu":
        parts = cc.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise _bad(path, "compute_capability", cc, "MAJOR.MINOR such as '8.7'")
    sources = data["sources"]
    if not isinstance(sources, list) or not all(
        isinstance(s, dict) and isinstance(s.get("title"), str) and isinstance(s.get("url"), str) for s in sources
    ):
        raise _bad(path, "sources", sources, "a list of {title = ..., url = ...} tables")
    if data["kind"] != "cpu" and not sources:
        raise _bad(path, "sources", sources, "at least one data-sheet citation")
    for key in ("peak_figures", "estimate_notes"):
        if key in data and not isinstance(data[key], str):
            raise _bad(path, key, data[key], "a string")
    return DeviceProfile(
        name=data["name"], description=data["description"], kind=data["kind"], aliases=tuple(aliases),
        peak_fp16_tflops=fp16, peak_int8_tops=int8, memory_bandwidth_gbs=bandwidth, compute_capability=cc,
        channel_alignment_fp16=_alignment(path, data, "channel_alignment_fp16"),
        channel_alignment_int8=_alignment(path, data, "channel_alignment_int8"),
        default_precision=data["default_precision"], tensorrt=data["tensorrt"], dla_cores=dla,
        sources=tuple(dict(s) for s in sources), peak_figures=data.get("peak_figures", ""),
        kernel_launch_us=launch, estimate_notes=data.get("estimate_notes", ""), path=path,
    )


@lru_cache(maxsize=8)
def _load_all(folder: str) -> tuple[dict[str, DeviceProfile], dict[str, str]]:
    profiles: dict[str, DeviceProfile] = {}
    aliases: dict[str, str] = {}
    for path in _files(Path(folder)):
        profile = parse_profile(path)
        profiles[profile.name] = profile
    for profile in profiles.values():
        for alias in profile.aliases:
            key = alias.lower()
            if key in profiles:
                raise _bad(profile.path, "aliases", alias, f"a name that is not also the profile {key!r}")
            if key in aliases and aliases[key] != profile.name:
                raise _bad(profile.path, "aliases", alias, f"an alias unique across profiles (also in {aliases[key]})")
            aliases[key] = profile.name
    return profiles, aliases


def all_profiles() -> dict[str, DeviceProfile]:
    """Every profile by name (validated; alias clashes raise CompressorError)."""
    return dict(_load_all(str(profiles_dir()))[0])


def resolve_name(name_or_alias: str) -> str:
    """Canonical profile name for a name or alias; CompressorError lists the choices when unknown."""
    profiles, aliases = _load_all(str(profiles_dir()))
    key = name_or_alias.strip().lower()
    if key in profiles:
        return key
    if key in aliases:
        return aliases[key]
    choices = ", ".join(sorted(profiles)) or f"none (no *.toml in {profiles_dir()})"
    raise CompressorError(f"unknown device profile {name_or_alias!r}; choose one of: {choices} "
                          f"(or cuda; aliases: see `compress profiles`)")


def load_profile(name_or_alias: str) -> DeviceProfile:
    """The profile for a name or alias, e.g. ``load_profile("jetson")`` is ``jetson-orin-nano``."""
    return _load_all(str(profiles_dir()))[0][resolve_name(name_or_alias)]


__all__ = ["DeviceProfile", "all_profiles", "list_profiles", "load_profile", "parse_profile", "profiles_dir",
           "resolve_name"]
