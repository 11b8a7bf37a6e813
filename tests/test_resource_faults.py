"""Resource faults (a full disk, a file size limit, memory) and decompression bombs end in one line
naming the file and the fix, with run.json saying failed and why; nothing saved earlier is touched.

The full-disk tests write into a small tmpfs of their own (`mount -t tmpfs`, which needs root, as
in the container CI runs in). Where mounting is not allowed they are skipped on a developer's
machine, and fail in CI (CI=true): a check that cannot run there must not pass silently.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.test_images import image_folder
from kilntest import TINY_DIGITS, kiln_command, read_run


def small_disk(path: Path, kilobytes: int) -> Iterator[Path]:
    """A tmpfs of `kilobytes` at `path`, unmounted afterwards; skips the test where mounting fails."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def shrink_to_used(disk: Path, room_kb: int) -> None:
    """Leave only `room_kb` free on the tmpfs at `disk`."""
    used_kb = (shutil.disk_usage(disk).total - shutil.disk_usage(disk).free) // 1024
    subprocess.run(["mount", "-o", f"remount,size={used_kb + room_kb}k", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Take every free byte of `disk`."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (2**16, 2**12, 1):
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def train(overrides: list[str]) -> None:
    from kiln.config import compose
    from kiln.stages import train as train_stage

    train_stage.main.call(compose("train", overrides))  # type: ignore[attr-defined]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


# -- training ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_past_the_file_size_limit_ends_in_one_line_and_records_failed(tmp_path):
    """`ulimit -f 40` (40 KiB): the logs and run.json fit, the first checkpoint (about 45 KB) does
    not. Python ignores SIGXFSZ, so the write fails with EFBIG inside torch's C++ writer."""
    run_dir = tmp_path / "run"
    command = " ".join([*kiln_command("train", *TINY_DIGITS, f"run_dir={run_dir}")])
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f 40; exec {command}"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    checkpoint = run_dir / "checkpoints" / "best.ckpt"  # the first checkpoint written
    assert line == (
        f"kiln train: error: a file grew past the file size limit of {40 * 1024} bytes while writing "
        f"{checkpoint}; raise the limit (`ulimit -f` in the shell that starts kiln) and run it again; "
        "files saved earlier are kept"
    )
    record = read_run(run_dir)
    assert record["status"] == "failed"
    assert record["error"] == line.removeprefix("kiln train: error: ")
    assert not list((run_dir / "checkpoints").iterdir())  # no half-written checkpoint


def test_training_on_a_full_disk_ends_in_one_line_and_keeps_the_best_checkpoint(tmp_path):
    """A 120 KiB disk takes the config, the logs and best.ckpt (45 KB), not last.ckpt as well."""
    from kiln.errors import describe_user_error

    for disk in small_disk(tmp_path / "disk", 120):
        run_dir = disk / "run"
        with pytest.raises(OSError) as raised:
            train([*TINY_DIGITS, f"run_dir={run_dir}"])
        line = describe_user_error(raised.value)
        assert line == (
            f"no space left on the device while writing {run_dir / 'checkpoints' / 'last.ckpt'}; free space "
            "there (or set paths.output_dir to a disk with room) and run it again; files saved earlier are kept"
        )
        record = read_run(run_dir)
        assert record["status"] == "failed" and record["error"] == line
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["best.ckpt"]
        best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
        assert best["epoch"] == 0  # the first epoch's checkpoint, whole


def test_the_failed_record_is_written_over_the_old_one_when_the_disk_has_no_byte_left(tmp_path):
    """No new file can be made on a disk with no free byte: the failed record goes over the old
    record's own bytes (run.json's 4 KiB page holds it), and run.json stays valid JSON."""
    from kiln.runs import Run

    for disk in small_disk(tmp_path / "disk", 64):
        run = Run(disk / "run")
        run.directory.mkdir()
        run.start(stage="train", seed=0, monitor={"metric": "val/loss", "mode": "min"}, config_hash="x")
        fill(disk)
        checkpoint = run.checkpoints / "last.ckpt"
        with pytest.raises(OSError), run.recording():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint))
        record = json.loads((run.directory / "run.json").read_text())
        assert record["status"] == "failed"
        assert record["error"].startswith(f"no space left on the device while writing {checkpoint}; ")
        assert record["seed"] == 0 and record["config_hash"] == "x"  # the rest of the record is kept


def test_running_out_of_memory_in_training_says_smaller_batch(tmp_path, monkeypatch):
    """A MemoryError (as under a memory limit) in the first forward pass of training."""
    from kiln.errors import describe_user_error

    def out_of_memory(self, x):
        raise MemoryError

    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch.nn.Linear, "forward", out_of_memory)
    with pytest.raises(MemoryError) as raised:
        train([*TINY_DIGITS, f"run_dir={run_dir}"])
    line = describe_user_error(raised.value)
    assert line == (
        "out of memory (MemoryError); use a smaller batch (data.batch_size) or a smaller model, or give "
        "the process more memory (its memory limit, `ulimit -v`, or a larger machine)"
    )
    assert read_run(run_dir)["status"] == "failed" and read_run(run_dir)["error"] == line


# -- export ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_on_a_full_disk_keeps_the_shipped_model_and_its_report(tmp_path):
    """A run exported once, copied to a disk with 24 KiB left, exported again: the new export
    runs out of space; the model.onnx and report shipped before are left byte for byte."""
    from kiln.config import compose
    from kiln.errors import describe_user_error
    from kiln.stages import export as export_stage

    def export(run_dir: Path) -> None:
        cfg = compose("export", [f"run={run_dir}", "export.latency_repeats=3"])
        export_stage.main.call(cfg)  # type: ignore[attr-defined]

    trained = tmp_path / "run"
    train([*TINY_DIGITS, f"run_dir={trained}"])
    export(trained)
    shipped = ("model.onnx", "report.json", "report.md", "report.png")
    before = {name: (trained / name).read_bytes() for name in shipped}
    for disk in small_disk(tmp_path / "disk", 2048):
        run_dir = disk / "run"
        shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("tensorboard"))
        shrink_to_used(disk, 24)
        with pytest.raises(OSError) as raised:
            export(run_dir)
        line = describe_user_error(raised.value)
        assert line is not None and line.startswith(f"no space left on the device while writing {run_dir}/")
        assert {name: (run_dir / name).read_bytes() for name in shipped} == before
        record = read_run(run_dir)
        assert record["status"] == "completed"  # the training stays as it was
        assert record["delivery"] == {"status": "failed", "reason": line}
        assert not [p.name for p in run_dir.glob(".*.tmp")]  # no temp file left behind


# -- decompression bombs -----------------------------------------------------------------------


def decompression_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 8x8 PNG whose header (IHDR, with its CRC) declares width x height: Pillow refuses
    it on open, from the header, as it would a 48 KB file that decodes to 1.2 GB."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's data starts after the signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type and data
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_in_a_training_folder_is_one_line_before_training(tmp_path, monkeypatch):
    from kiln.data.images import ImageFolderDataModule
    from kiln.errors import KilnError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    folder = image_folder(tmp_path / "images", {"cat": 6, "dog": 6})
    bomb = decompression_bomb(folder / "cat" / "huge.png")
    run_dir = tmp_path / "run"
    with pytest.raises(KilnError) as raised:
        train(["data=image_folder", f"data.path={folder}", "data.num_workers=0", f"run_dir={run_dir}"])
    assert str(raised.value) == (
        f"data.path={folder}: {bomb} declares 20000x20000 = 400000000 pixels, over Pillow's "
        "decompression-bomb limit of 178956970 (a small file that would decode to gigabytes); remove it, "
        "or, if it is a genuine image, raise the limit with +data.max_image_pixels=400000000"
    )
    assert not (run_dir / "checkpoints").exists()  # refused before training
    # the fix it gives: with the limit raised, the folder is listed (this bomb's pixels are not there,
    # so the loader would then skip it as damaged)
    datamodule = ImageFolderDataModule(
        path=str(folder), image_size=16, num_workers=0, max_image_pixels=400000000
    )
    datamodule.setup()
    assert bomb in datamodule.images.paths
