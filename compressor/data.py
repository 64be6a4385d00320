"""Reading calibration and evaluation images: folders, tar archives, tensor files."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from compressor.archive import scan_tar
from compressor.errors import CompressorError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHIVE_CACHE_BYTES = 512 * 2**20  # image bytes of a tar kept from the listing pass


@dataclass(frozen=True)
class ImageSet:
    """A normalized image tensor with optional labels.

    Attributes:
        images: N x C x H x W float32.
        labels: N int64 labels (class folder index) or None for unlabelled data.
        classes: Class folder names in label order (empty when unlabelled).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...] = ()


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``3x32x32`` into (C, H, W)."""
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise UsageError(f"--input-shape {text!r} is not CxHxW with positive integers; write e.g. 3x224x224")
    return dims  # type: ignore[return-value]


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """Parse ``0.485,0.456,0.406``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a comma-separated list of numbers; write e.g. 0.5,0.5,0.5"
        ) from None
    return values


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:  # its message names the in-memory buffer, not the file
        raise CompressorError(f"cannot read image {name!r} (not an image format Pillow can decode); "
                              "remove it or fix the file") from exc
    except OSError as exc:
        raise CompressorError(f"cannot read image {name!r} ({exc}); remove it or fix the file") from exc
    if img.mode in ("P", "CMYK", "YCbCr", "LA", "I;16", "I", "F"):
        img = img.convert("RGB" if img.mode in ("P", "CMYK", "YCbCr") else "L")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _label_of(relative: str, labelled: bool) -> str | None:
    parts = Path(relative).parts
    return parts[-2] if labelled and len(parts) >= 2 else None


class _Source:
    """Lists image entries (relative names) and reads the bytes of a chosen subset.

    A plain or gzip tar that fits in memory is read in one fast pass (``archive.scan_tar``).
    Otherwise it is streamed with tarfile: while listing it, the image bytes are kept (up to
    ARCHIVE_CACHE_BYTES), so that reading the chosen subset needs no second pass.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_tar = not path.is_dir()
        self.cache: dict[str, bytes | memoryview] | None = None
        if not self.is_tar:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.entries = [str(p.relative_to(path)) for p in files]
            return
        files = scan_tar(path)
        if files is not None:
            self.cache = {n: data for n, data in files if n.lower().endswith(IMAGE_SUFFIXES)}
            self.entries = sorted(self.cache)
            return
        names, cache, cached_bytes = [], {}, 0
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES)):
                        continue
                    names.append(member.name)
                    if cache is not None:
                        cached_bytes += member.size
                        if cached_bytes > ARCHIVE_CACHE_BYTES:
                            cache = None  # too large to hold: read_all streams the archive again
                        else:
                            cache[member.name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            reason = str(exc).splitlines()[0].rstrip(":")
            raise CompressorError(f"cannot read archive {str(path)!r} ({reason}); pass a valid .tar/.tar.gz") from exc
        self.entries = sorted(names)
        self.cache = cache

    def read_all(self, wanted: list[str], progress) -> dict[str, bytes]:
        """Bytes of every wanted entry; a tar not held in memory is streamed once in archive order."""
        if not self.is_tar:
            return {e: (self.path / e).read_bytes() for e in progress(wanted)}
        if self.cache is not None:
            return {e: bytes(self.cache[e]) for e in wanted}
        remaining = set(wanted)
        out: dict[str, bytes] = {}
        bar = progress(total=len(wanted))
        with tarfile.open(self.path, "r|*") as tar:
            for member in tar:
                if member.name in remaining:
                    out[member.name] = tar.extractfile(member).read()
                    remaining.discard(member.name)
                    bar.update(1)
                    if not remaining:
                        break
        bar.close()
        return out


def load_images(
    path: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    labelled: bool = False,
    progress: bool = False,
    what: str = "calibration",
) -> ImageSet:
    """Read images or a tensor file into a normalized N x C x H x W tensor.

    Args:
        path: A folder of images (flat or class subfolders), a .tar/.tar.gz of images, or a
            .pt/.npy tensor N x C x H x W (already normalized; ``mean``/``std`` not applied).
        limit: Keep at most this many, a random subset drawn with ``seed``.
        seed: Seed of the subset.
        input_shape: (C, H, W) to resize images to (aspect ratio kept, centre crop); None keeps
            the images' own size, which must then be the same for all.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation.
        labelled: Labels are the sorted class-folder names' indices (required for eval data).
        progress: Show a progress bar.
        what: "calibration" or "evaluation", for messages.
    """
    path = Path(path)
    if not path.exists():
        raise CompressorError(f"{what} data {str(path)!r} does not exist; check the path")
    if path.suffix in (".pt", ".npy"):
        if labelled:
            raise CompressorError(f"{what} data must be labelled images in class folders, not {path.suffix} tensors")
        return ImageSet(_load_tensor(path, limit, seed, input_shape), None)
    source = _Source(path)
    entries = source.entries
    if not entries:
        raise CompressorError(f"{what} data {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    classes: tuple[str, ...] = ()
    if labelled:
        names = [_label_of(e, True) for e in entries]
        if any(n is None for n in names):
            raise CompressorError(f"{what} data {str(path)!r} must have class subfolders (class/image.jpg)")
        classes = tuple(sorted(set(names)))
    if limit is not None and limit < len(entries):
        order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed))[:limit]
        entries = [entries[i] for i in sorted(order.tolist())]
    # disable=None: no bar where stderr is not a terminal (CI logs), only the pipeline's stage lines
    bar = partial(tqdm, desc=f"reading {what} images", disable=None if progress else True, leave=False, unit="img")
    raw = source.read_all(entries, bar)
    arrays = [_decode(raw[e], e) for e in entries]
    images = _stack(arrays, input_shape, mean, std, what)
    labels = None
    if labelled:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[_label_of(e, True)] for e in entries], dtype=torch.long)
    return ImageSet(images, labels, classes)


def _stack(arrays, input_shape, mean, std, what) -> torch.Tensor:
    channels = {a.shape[2] for a in arrays}
    if len(channels) > 1:
        raise CompressorError(f"{what} images mix channel counts {sorted(channels)}; convert them to one format")
    (c,) = channels
    if input_shape is not None and input_shape[0] != c:
        raise CompressorError(
            f"{what} images have {c} channel(s) but the input shape has {input_shape[0]}; "
            "convert the images or fix --input-shape"
        )
    if len(mean) != c or len(std) != c:
        raise UsageError(f"--mean/--std give {len(mean)}/{len(std)} values for {c}-channel images; give {c} each")
    if any(s <= 0 for s in std):
        raise UsageError(f"--std {','.join(map(str, std))} must be positive")
    if input_shape is None:
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
            raise CompressorError(
                f"{what} images come in {len(sizes)} sizes (HxW {shown}); pass --input-shape to resize them "
                f"all to the model's input, e.g. --input-shape {c}x224x224"
            )
    target = tuple(input_shape[1:]) if input_shape is not None else arrays[0].shape[:2]
    tensors = [_fit(torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float().div_(255.0), target)
               for a in arrays]
    x = torch.stack(tensors)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _fit(image: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """``image`` (C x h x w) scaled, aspect ratio kept, to cover ``target`` (H, W), then centre-cropped to it.

    Stretching to the target instead would feed the model shapes it never saw in training; this is
    the usual resize-then-centre-crop of image classifiers' evaluation (without its margin).
    """
    (h, w), (height, width) = image.shape[1:], target
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[:, top : top + height, left : left + width]


def _load_tensor(path: Path, limit, seed, input_shape) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompressorError(
            f"cannot read tensor file {str(path)!r} ({type(exc).__name__}); save an N x C x H x W tensor"
        ) from exc
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CompressorError(f"tensor file {str(path)!r} holds {shape}; it must be a non-empty N x C x H x W tensor")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise CompressorError(f"tensor file {str(path)!r} contains NaN or infinite values")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        if x.shape[1] != input_shape[0]:
            raise CompressorError(
                f"tensor file {str(path)!r} has {x.shape[1]} channels but the input shape has {input_shape[0]}"
            )
        x = F.interpolate(x, size=tuple(input_shape[1:]), mode="bilinear", align_corners=False)
    if limit is not None and limit < x.shape[0]:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
        x = x[order.sort().values]
    return x.contiguous()
