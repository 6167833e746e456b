"""shards.tarstream against webdataset's tarfile-based iterator, on real tar files of every header kind."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from shards.tarstream import iter_tar

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def make_tar(fmt: int) -> bytes:
    """Samples with short, long (ustar prefix / GNU long name / PAX path) and non-ASCII names, a float
    mtime (a PAX header per member, as webdataset writes), an empty member, a directory, a symlink and
    webdataset's `__meta__` file."""
    buf = io.BytesIO()
    long_dir = "d" * 90 + "/" + "e" * 60
    members = [("train-00000000.png", b"\x89PNG" + bytes(range(256)) * 3), ("train-00000000.cls", b"3"),
               (f"{long_dir}/train-00000001.png", b"x" * 1000), (f"{long_dir}/train-00000001.cls", b"1"),
               ("train-00000002.png", b""), ("train-00000002.cls", b"0"), ("__meta__/info.json", b"{}")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [("f" * 120 + ".png", b"long name"), ("caf\u00e9-3.png", b"non-ascii")]
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 946684800.5 if fmt == tarfile.PAX_FORMAT else 946684800
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("train-00000003.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tar.addfile(link)
    return buf.getvalue()


def reference(data: bytes) -> list[tuple[str, bytes]]:
    return [(f["fname"], f["data"]) for f in tar_file_iterator(io.BytesIO(data))]


def ours(stream) -> list[tuple[str, bytes]]:
    return [(f["fname"], f["data"]) for f in iter_tar(stream)]


class Trickle(io.RawIOBase):
    """A pipe-like stream: at most 100 bytes per read."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        n = 100 if n is None or n < 0 else min(n, 100)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_members_as_webdataset(fmt):
    data = make_tar(FORMATS[fmt])
    want = reference(data)
    assert len(want) >= 6 and not any(name.startswith("__") for name, _ in want)
    assert ours(io.BytesIO(data)) == want
    assert ours(Trickle(data)) == want
    assert ours(io.BytesIO(gzip.compress(data))) == want


def test_truncated_stream_yields_complete_members_then_fails():
    data = make_tar(tarfile.PAX_FORMAT)
    want = reference(data)
    cut = data.index(b"x" * 1000) + 500  # inside the third member's data
    got = []
    with pytest.raises(tarfile.ReadError):
        for f in iter_tar(io.BytesIO(data[:cut])):
            got.append((f["fname"], f["data"]))
    assert got == want[:2]


def test_garbage_header_fails_instead_of_guessing():
    data = bytearray(make_tar(tarfile.USTAR_FORMAT))
    data[600:700] = b"\xff" * 100  # inside the first member's data: fine, it is data
    assert len(ours(io.BytesIO(bytes(data)))) == 6
    bad = bytearray(data)
    bad[0:10] = b"garbage!!!"  # the first header's name changes: its checksum no longer matches
    with pytest.raises(tarfile.ReadError):
        ours(io.BytesIO(bytes(bad)))
    with pytest.raises(tarfile.ReadError):
        ours(io.BytesIO(b"this is not a tar file at all" * 30))
