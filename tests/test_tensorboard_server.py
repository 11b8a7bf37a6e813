"""`kiln tensorboard`: a real run served by a real TensorBoard, read through its HTTP API and seen
in headless Chromium.

One tiny digits run is trained through the CLI; `kiln tensorboard dir=<runs>` serves it on a free
loopback port. The API answers are checked against the event files and run.json; screenshots of
the scalars and hparams dashboards must show charts and a table, not a blank or empty page.
Chromium is a requirement of this module (scripts/install_browser.sh installs it): missing, the
browser test fails rather than skips.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kilntest import TINY_DIGITS, assert_ok, kiln_command, read_run, run_dirs, run_kiln, wait_for

pytestmark = pytest.mark.slow

START_TIMEOUT = 180  # seconds for TensorBoard to bind, and then to load the run (2 busy cores)
WINDOW = (1400, 900)
# The dashboard below TensorBoard's orange header bar and right of the settings / run sidebar.
CHART_AREA = (360, 130, 1400, 900)  # left, top, right, bottom in pixels
DASHBOARDS = ("scalars", "hparams")  # the ones screenshotted
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@dataclass
class Board:
    url: str
    process: subprocess.Popen[str]
    output: list[str]


def start_board(command: list[str], cwd: Path, address: str) -> Board:
    """Start a TensorBoard process, wait for the line with its address (regex `address`, group 1)
    and then for its first load of the logs, and return it."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:  # a thread, so that waiting for a line can time out and the pipe never fills
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    url = None
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            match = re.search(address, lines.get(timeout=1))
        except queue.Empty:
            continue
        url = match.group(1) if match else None
    if url is None:
        stop(process)
        pytest.fail(f"no address from {' '.join(command)} in {START_TIMEOUT} s:\n{''.join(output)}")
    return Board(url=url, process=process, output=output)


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def get(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST `body` as JSON) and decode the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_runs(board: Board) -> list[str]:
    """The runs TensorBoard lists, once its first pass over the logs has finished (until then
    /data/runs answers []): polled, failing fast if the server exits."""
    runs: list[str] = wait_for(
        lambda: get(f"{board.url}/data/runs"),
        f"TensorBoard at {board.url} to list the runs",
        timeout=START_TIMEOUT,
        process=board.process,
        output=board.output,
        poll=0.5,
    )
    return runs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny digits run (MLP, 2 epochs), trained through the real CLI."""
    base = tmp_path_factory.mktemp("tensorboard")
    assert_ok(run_kiln(["train", *TINY_DIGITS, f"paths.output_dir={base / 'runs'}"], base))
    (run_dir,) = run_dirs(base / "runs")
    return run_dir


@pytest.fixture(scope="module")
def board(run: Path) -> Iterator[Board]:
    """`kiln tensorboard dir=<runs/train>` serving the run; stopped at teardown."""
    served = start_board(
        kiln_command("tensorboard", f"dir={run.parent}"),
        run.parent,
        r"kiln tensorboard: (http://127\.0\.0\.1:\d+) \(Ctrl-C stops it\)",
    )
    try:
        wait_for_runs(served)
        yield served
    finally:
        stop(served.process)


@pytest.fixture(scope="module")
def tb_run(board: Board, run: Path) -> str:
    """The run's name in TensorBoard: `<run dir name>/.` (logdir_spec name + the event files' subdir)."""
    runs = get(f"{board.url}/data/runs")
    assert runs == [f"{run.name}/."], runs
    return str(runs[0])


@pytest.fixture(scope="module")
def events(run: Path) -> Any:
    """What the run's event files hold, read without any server."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_the_address_is_loopback_and_names_the_run(board: Board, run: Path) -> None:
    assert board.url.startswith("http://127.0.0.1:")
    # kiln lists each run it serves before the address: name, then its tensorboard/ directory
    assert any(run.name in line and str(run / "tensorboard") in line for line in board.output)


def test_scalar_tags_are_the_runs_own(board: Board, tb_run: str, events: Any) -> None:
    tags = set(get(f"{board.url}/data/plugin/scalars/tags")[tb_run])
    assert {"train/loss", "val/loss", "val/acc", "test/acc"} <= tags
    assert "lr-AdamW" in tags  # the learning-rate monitor's tag for the default AdamW optimizer
    assert tags == set(events.Tags()["scalars"])


def test_val_acc_values_equal_the_event_files(board: Board, tb_run: str, events: Any) -> None:
    query = urllib.parse.urlencode({"run": tb_run, "tag": "val/acc"})
    served = [(step, value) for _, step, value in get(f"{board.url}/data/plugin/scalars/scalars?{query}")]
    written = [(event.step, event.value) for event in events.Scalars("val/acc")]
    assert len(written) == 2  # one value per epoch
    assert served == written


def test_hparams_session_carries_the_real_final_metrics(board: Board, tb_run: str, run: Path) -> None:
    answer = get(
        f"{board.url}/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ALL_STATUSES,
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
        },
    )
    (group,) = answer["sessionGroups"]
    assert group["name"] == tb_run
    metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    test_metrics = read_run(run)["test_metrics"]
    assert "hp_metric" not in metrics  # no placeholder column
    assert metrics["test/acc"] == pytest.approx(test_metrics["test/acc"], abs=1e-6)
    assert set(test_metrics) <= set(metrics)
    assert group["hparams"]["trainer.max_epochs"] == 2


def test_images_plugin_has_the_confusion_matrix(board: Board, tb_run: str) -> None:
    tags = get(f"{board.url}/data/plugin/images/tags")[tb_run]
    assert "test/confusion_matrix" in tags
    query = urllib.parse.urlencode({"run": tb_run, "tag": "test/confusion_matrix"})
    (sample,) = get(f"{board.url}/data/plugin/images/images?{query}")
    with urllib.request.urlopen(f"{board.url}/data/plugin/images/individualImage?{sample['query']}") as reply:
        image = np.asarray(Image.open(BytesIO(reply.read())).convert("L"), dtype=float)
    assert min(image.shape) >= 200 and image.std() > 10  # a drawn figure, not an empty canvas


# ---------------------------------------------------------------------------------------------
# The dashboards in a browser
# ---------------------------------------------------------------------------------------------


def screenshot(url: str, path: Path) -> np.ndarray:
    """A headless Chromium screenshot of `url`: the chart area as an RGB array."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; run `bash scripts/install_browser.sh` (scripts/test.sh does)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from another run
        result = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={path}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--virtual-time-budget=10000",  # lets the dashboard fetch its data and draw
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert path.is_file(), f"chromium wrote no screenshot of {url}:\n{result.stderr[-3000:]}"
    print(f"screenshot of {url}: {path}")
    image = Image.open(path).convert("RGB")
    assert image.size == WINDOW
    return np.asarray(image.crop(CHART_AREA), dtype=float)


def gray(area: np.ndarray) -> np.ndarray:
    return np.asarray(area @ [0.299, 0.587, 0.114])


def run_colour_pixels(area: np.ndarray) -> int:
    """Pixels in TensorBoard's orange of a first run's curve (the header bar is outside the area)."""
    red, green, blue = area[..., 0], area[..., 1], area[..., 2]
    return int(np.sum((red > 200) & (red - blue > 100) & (green < 180)))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def empty_dashboards(tmp_path_factory: pytest.TempPathFactory, shots: Path) -> dict[str, np.ndarray]:
    """The same dashboards of a TensorBoard with no logs at all: what a blank result looks like.

    Started with TensorBoard's own CLI, since `kiln tensorboard` refuses a directory without runs."""
    empty = tmp_path_factory.mktemp("no-logs")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(empty), "--host", "127.0.0.1"]
    served = start_board(
        [*command, "--port", "0", "--load_fast", "false"], empty, r"(http://127\.0\.0\.1:\d+)"
    )
    try:
        return {name: screenshot(f"{served.url}/#{name}", shots / f"empty_{name}.png") for name in DASHBOARDS}
    finally:
        stop(served.process)


@pytest.mark.parametrize("dashboard", DASHBOARDS)
def test_dashboard_screenshot_shows_the_run(
    board: Board, shots: Path, empty_dashboards: dict[str, np.ndarray], dashboard: str
) -> None:
    area = screenshot(f"{board.url}/#{dashboard}", shots / f"{dashboard}.png")
    empty = empty_dashboards[dashboard]
    spread, changed = gray(area).std(), float(np.mean(np.abs(gray(area) - gray(empty)) > 30))
    print(f"{dashboard}: pixel std {spread:.1f}, {changed:.1%} of the chart area differs from no logs")
    # Charts and a table draw lines and text: a blank page would be one flat colour (std ~0) ...
    assert spread > 8, f"{dashboard}: the chart area is nearly blank (std {spread:.1f})"
    # ... and TensorBoard without logs draws a text page that the run's dashboard must not match
    # (measured: about 4% of the area differs; a page identical to it: 0%).
    assert changed > 0.02, f"{dashboard}: looks like TensorBoard without logs ({changed:.1%} differs)"
    if dashboard == "scalars":  # the run's curves, in its colour (measured: ~1100 pixels; none without logs)
        assert run_colour_pixels(area) > 300 and run_colour_pixels(empty) == 0


def test_a_directory_without_runs_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "some_run" / "tensorboard").mkdir(parents=True)  # a run folder with no event files
    result = run_kiln(["tensorboard", f"dir={tmp_path}"], tmp_path, timeout=60)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kiln tensorboard: error: ") and str(tmp_path) in lines[0]
    assert "no TensorBoard event files" in lines[0]
    assert result.stdout == ""


def test_a_missing_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_runs"
    result = run_kiln(["tensorboard", f"dir={missing}"], tmp_path, timeout=60)
    assert result.returncode == 2, result
    (line,) = result.stderr.strip().splitlines()
    assert (
        line.startswith("kiln tensorboard: error: ") and str(missing) in line and "no such directory" in line
    )
