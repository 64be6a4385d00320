import gzip
import io
import tarfile

import pytest

from compressor.archive import scan_tar

NAMES = ["a.jpg", "dir/b.png", "deep/" + "x" * 120 + "/c.jpg", "é/ü.jpg"]


def _archive(tmp_path, fmt, compress=True, names=NAMES):
    path = tmp_path / f"t-{fmt}.tar{'.gz' if compress else ''}"
    with tarfile.open(path, "w:gz" if compress else "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)  # sizes that do not fill whole blocks
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return path


def _with_tarfile(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("compress", [True, False])
def test_matches_tarfile(tmp_path, fmt, compress):
    path = _archive(tmp_path, fmt, compress)
    found = [(name, bytes(data)) for name, data in scan_tar(path)]
    assert found == _with_tarfile(path)
    assert [n for n, _ in found] == NAMES


def test_ustar_prefix(tmp_path):
    name = "p" * 90 + "/" + "q" * 60 + "/file.jpg"  # over 100 characters: split into prefix and name
    path = _archive(tmp_path, tarfile.USTAR_FORMAT, names=[name])
    assert [n for n, _ in scan_tar(path)] == [name] == [n for n, _ in _with_tarfile(path)]


def test_leaves_other_archives_to_tarfile(tmp_path, monkeypatch):
    good = _archive(tmp_path, tarfile.PAX_FORMAT, compress=False)
    raw = bytearray(good.read_bytes())
    raw[0] ^= 1  # first header's checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    assert scan_tar(bad) is None
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_bytes(gzip.compress(b"hello" * 200))
    assert scan_tar(not_tar) is None
    bz2 = tmp_path / "t.tar.bz2"
    with tarfile.open(bz2, "w:bz2") as tar:
        tar.add(good, arcname="inner.tar")
    assert scan_tar(bz2) is None
    monkeypatch.setattr("compressor.archive.MAX_INFLATED_BYTES", 1024)
    assert scan_tar(_archive(tmp_path, tarfile.PAX_FORMAT)) is None
