"""What is not a regular file is refused before it is opened (a FIFO named .png must not hang), and each
problem is said as it is: a symbolic link loop, a broken link, a directory, a missing or empty file."""

from __future__ import annotations

import os
import signal

import pytest

from medvl.data.dicom import read_dicom
from medvl.data.images import read_xray
from medvl.data.scans import load_scan
from medvl.errors import ImageNotFoundError, InvalidImageError


@pytest.fixture
def no_hang():
    """Fail (instead of waiting forever) if a read blocks for 20 s."""

    def alarm(*_):
        raise TimeoutError("the read blocked")

    before = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("name", ["scan.png", "scan.dcm", "scan"])
def test_fifo_is_refused_without_opening(tmp_path, no_hang, name):
    path = tmp_path / name
    os.mkfifo(path)
    for read in (read_xray, read_dicom, lambda p: load_scan(p, 32)):
        with pytest.raises(InvalidImageError, match="FIFO") as info:
            read(path)
        assert type(info.value) is InvalidImageError and str(info.value).startswith(f"{path}: ")


def test_symlink_loop_is_not_called_missing(tmp_path):
    path = tmp_path / "loop.png"
    os.symlink(path, path)
    with pytest.raises(InvalidImageError, match="symbolic link loop") as info:
        read_xray(path)
    assert type(info.value) is InvalidImageError and str(path) in str(info.value)
    assert "no such file" not in str(info.value)


def test_missing_and_broken_link_are_image_not_found(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    for name, says in (("missing.png", "no such file"), ("broken.png", "broken symbolic link")):
        with pytest.raises(ImageNotFoundError, match=says) as info:
            read_xray(tmp_path / name)
        # Both an InvalidImageError (the batch loops catch it) and a FileNotFoundError (as before).
        assert isinstance(info.value, InvalidImageError) and isinstance(info.value, FileNotFoundError)
        assert str(tmp_path / name) in str(info.value)


def test_directory_and_empty_file(tmp_path):
    (tmp_path / "d.png").mkdir()
    (tmp_path / "empty.dcm").write_bytes(b"")
    for name, says in (("d.png", "directory"), ("empty.dcm", "empty file")):
        for read in (read_xray, read_dicom):
            with pytest.raises(InvalidImageError, match=says) as info:
                read(tmp_path / name)
            assert type(info.value) is InvalidImageError and str(tmp_path / name) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    path.chmod(0)
    with pytest.raises(InvalidImageError, match="permission denied|cannot be read"):
        read_xray(path)
