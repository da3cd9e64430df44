"""Bad command-line input: argparse refuses it (exit 2, one line naming the option) before anything runs; inputs
that fail later (files that are not images, broken sidecars) exit 1 with one typed line, never a traceback."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from composer.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = int(exit.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken.txt"
    path.write_text("x")
    return path


USAGE = {
    "seed over 32 bits": ["a cat", "--seed", str(2**70)],
    "negative seed": ["a cat", "--seed", "-1"],
    "no images": ["a cat", "--num-images", "0"],
    "zero steps": ["a cat", "--steps", "0"],
    "negative steps": ["a cat", "--steps", "-3"],
    "out is a file": ["a cat", "--out", "{file}"],
    "out is /dev/null": ["a cat", "--out", "/dev/null"],
    "plot under a file": ["a cat", "--plot", "{file}/plots"],
    "non-UTF-8 prompt": ["a c\udcfft"],
    "non-UTF-8 lora name": ["a cat", "--loras", "zor\udcffbex:0.5"],
    "export out a folder": ["export", "zorbex", "--out", "{dir}"],
    "convert out under a file": ["convert", "in.safetensors", "--out", "{file}/x.safetensors"],
    "search top 0": ["search", "cat", "-k", "0"],
    "tau 0": ["a cat", "--method", "switch", "--tau", "0"],
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_bad_options_exit_2_with_one_line(case: str, a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [arg.format(file=a_file, dir=a_file.parent) for arg in USAGE[case]]
    code, err = run(argv, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("compose") or last.startswith("usage") or "error:" in last
    assert "error:" in last


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` (a decompression bomb's signature) with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _good_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    return path


JUDGE = {
    "not an image": lambda p: p.write_bytes(b"API_KEY=secret\n"),
    "truncated PNG": lambda p: p.write_bytes(_good_png(p).read_bytes()[:60]),
    "decompression bomb": lambda p: p.write_bytes(_png_header_only(30000, 30000)),
}


@pytest.mark.parametrize("case", sorted(JUDGE))
def test_judge_on_a_broken_image_exits_1_with_a_typed_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "0-0.png"
    JUDGE[case](image)
    image.with_suffix(".json").write_text(json.dumps({"prompt": "a cat", "adapters": []}))
    code, err = run(["judge", str(image)], capsys)
    assert code == 1
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert "API_KEY" not in err


@pytest.mark.parametrize(
    "sidecar",
    ['{"prompt": 5, "adapters": []}', '{"prompt": "a", "adapters": [1]}', '{"adapters": {"name": 1}}', "[]", "{"],
)
def test_judge_with_a_malformed_sidecar_exits_1(
    sidecar: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _good_png(tmp_path / "0-0.png")
    image.with_suffix(".json").write_text(sidecar)
    code, err = run(["judge", str(image)], capsys)
    assert code == 1
    assert err.startswith("error: ")


def test_index_and_info_list_a_symlink_loop_and_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    library = tmp_path / "lib"
    library.mkdir()
    os.symlink("loop.safetensors", library / "loop.safetensors")
    os.mkfifo(library / "pipe.safetensors")
    code, _ = run(["index", str(library)], capsys)
    assert code == 0
    code, err = run(["info", "loop", "--library", str(library)], capsys)
    assert code == 0, err
    code, err = run(
        ["a cat", "--loras", "loop:0.5", "--library", str(library), "--model", "tiny-sd", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 1
    assert "NonRegularFileError" in err or "not a regular file" in err or "cannot" in err
