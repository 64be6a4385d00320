import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import load_images, parse_shape
from compressor.errors import CompressorError, UsageError


def _write(folder, n=6, size=(12, 10), mode="RGB", classes=("cat", "dog")):
    for i in range(n):
        cls = classes[i % len(classes)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        arr = np.full((size[1], size[0], 3), i * 20, dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / cls / f"{i}.png")


def test_folder_labels_resize_and_normalize(tmp_path):
    _write(tmp_path)
    data = load_images(tmp_path, input_shape=(3, 8, 8), mean=(0, 0, 0), std=(1, 1, 1), labelled=True)
    assert data.images.shape == (6, 3, 8, 8)
    assert data.classes == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted names: 0,2,4 are cat; 1,3,5 dog
    assert torch.allclose(data.images[0], torch.zeros(3, 8, 8))


def test_no_progress_bar_in_a_log(tmp_path, capsys):
    """Where stderr is not a terminal (a CI log), reading images writes no progress bar."""
    _write(tmp_path)
    load_images(tmp_path, input_shape=(3, 8, 8), progress=True)
    assert "reading" not in capsys.readouterr().err


def test_resize_keeps_the_aspect_ratio_and_crops_the_centre(tmp_path):
    ramp = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (8, 1, 3))  # 8 high, 16 wide
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    data = load_images(tmp_path, input_shape=(3, 8, 8), mean=(0, 0, 0), std=(1, 1, 1))
    expected = torch.from_numpy(ramp[:, 4:12]).permute(2, 0, 1).float() / 255  # no scaling needed: crop only
    assert torch.allclose(data.images[0], expected)
    half = load_images(tmp_path, input_shape=(3, 4, 4), mean=(0, 0, 0), std=(1, 1, 1)).images[0]
    assert half.shape == (3, 4, 4) and bool((half[0, 0, 1:] > half[0, 0, :-1]).all())  # still a ramp, not squeezed


def test_mixed_sizes_need_an_input_shape(tmp_path):
    _write(tmp_path / "a", n=2, size=(12, 10))
    _write(tmp_path / "b", n=2, size=(8, 8))
    with pytest.raises(CompressorError, match="come in 2 sizes.*--input-shape 3x224x224"):
        load_images(tmp_path)
    assert load_images(tmp_path, input_shape=(3, 8, 8)).images.shape == (4, 3, 8, 8)


def test_tar_subset_is_seeded(tmp_path):
    _write(tmp_path / "src", n=10)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="train")
    a = load_images(archive, limit=4, seed=1)
    b = load_images(archive, limit=4, seed=1)
    c = load_images(archive, limit=4, seed=2)
    assert a.images.shape[0] == 4 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("reader", ["scan", "tarfile-held-in-memory", "tarfile-streamed-twice"])
def test_tar_reads_the_same_subset_as_the_folder(tmp_path, monkeypatch, reader):
    if reader != "scan":
        monkeypatch.setattr("compressor.data.scan_tar", lambda path: None)
        monkeypatch.setattr("compressor.data.ARCHIVE_CACHE_BYTES", 2**30 if reader.endswith("memory") else 0)
    _write(tmp_path / "src", n=10)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="train")
    from_tar = load_images(archive, limit=4, seed=3, labelled=True)
    from_folder = load_images(tmp_path / "src", limit=4, seed=3, labelled=True)
    assert torch.equal(from_tar.images, from_folder.images)
    assert torch.equal(from_tar.labels, from_folder.labels)


def test_tensor_file(tmp_path):
    torch.save(torch.randn(5, 3, 4, 4), tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), dtype=np.float32))
    assert load_images(tmp_path / "x.pt", limit=3).images.shape == (3, 3, 4, 4)
    assert load_images(tmp_path / "x.npy").images.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt_image", "bad_tensor", "wrong_channels", "corrupt_tar"])
def test_bad_data_is_one_line_error(tmp_path, case):
    path = tmp_path / "d"
    shape = None
    if case == "empty":
        path.mkdir()
    elif case == "corrupt_image":
        path.mkdir()
        (path / "a.jpg").write_bytes(b"not an image")
    elif case == "bad_tensor":
        path = tmp_path / "x.pt"
        torch.save(torch.randn(3, 4), path)
    elif case == "wrong_channels":
        _write(path, mode="L")
        shape = (3, 8, 8)
    elif case == "corrupt_tar":
        path = tmp_path / "x.tar.gz"
        path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CompressorError) as info:
        load_images(path, input_shape=shape, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert "\n" not in str(info.value)


def test_parse_shape():
    assert parse_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(UsageError):
        parse_shape("32x32")


