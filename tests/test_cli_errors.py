"""The CLI's error contract: any bad input, including an operating-system error on a file, is one line on
stderr and exit status 2, never a traceback."""

from __future__ import annotations

import errno

import pytest

import medvl.cli as cli


@pytest.mark.parametrize(
    "exc, expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/index.parquet"),
            "No space left on device: /data/out/index.parquet",
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "scan.png"), "Is a directory: scan.png"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "Permission denied: /ro/run"),
        (ValueError("scan.png is not an image"), "scan.png is not an image"),
    ],
)
def test_errors_are_one_line_and_status_2(monkeypatch, capsys, exc, expected):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_dispatch", fail)
    code = cli.main(["label", "-"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"medvl: error: {expected}\n"


def test_grounding_is_for_diffusion_runs(capsys, tmp_path):
    code = cli.main(
        [
            "evaluate",
            "report",
            "--run",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--out",
            "x.json",
            "--grounding",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--grounding" in err and "diffusion" in err and "Traceback" not in err
