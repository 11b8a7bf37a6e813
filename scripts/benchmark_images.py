"""Images from disk: `kiln train` against a hand-written PyTorch loop, kiln's memory on a folder
larger than the memory it may use, and ONNX inference against torch eager.

    .venv/bin/python scripts/benchmark_images.py                  # the defaults: about 5 minutes on 2 busy CPU cores
    .venv/bin/python scripts/benchmark_images.py --skip-memory    # without the large folder (about 1.5 minutes less)
    .venv/bin/python scripts/benchmark_images.py --rounds 3 --images 640    # steadier figures, longer
    .venv/bin/python scripts/benchmark_images.py --augment-only   # 0. alone (about a minute)
    .venv/bin/python scripts/benchmark_images.py --depthwise --size 32 --epochs 10
                     # static int8 of a depthwise net (MobileNetV3-Small 0.5) by compress=auto, with its attempts
    .venv/bin/python scripts/benchmark_images.py --compression-run runs/train/<images_resnet run>
                     # its delivery: shipped variant, speed-up over ORT fp32 at batch 256, drop, cost

0. Augmentation: albumentations (kiln's pipeline: kiln.data.augment's transforms, then
   kiln.data.images.to_tensor) against torchvision's transforms.v2 doing the same steps (kiln's
   `data=image_folder` default: random resized crop of 80-100% of the area, a flip only if
   configured, scale to [0, 1], mean/std; evaluation: resize, scale, mean/std), in one process on
   one thread (torch and OpenCV), as each of kiln's DataLoader workers runs. Inputs are images
   already decoded as kiln's workers decode them (--augment-images of the folder, and the same
   resized to 375 x 500 for a photo-sized case at 224), so decoding is left out. torchvision is
   written three ways: ToImage first (a contiguous CHW uint8 tensor, as its docs write it), on a
   CHW view of the decoded HWC array, and on the PIL image. Rounds (--augment-rounds) run each way
   over all images, in an order that rotates per round; printed: the median microseconds per image
   and, per way, the median [min, max] over rounds of its time over albumentations' in the same
   round. kiln uses albumentations: it measured quicker than every torchvision way at both sizes.

1. Throughput. One folder of JPEG files (--images of --size x --size pixels, 10 classes, written
   here), one model (kiln.models.backbones.backbone, --model), one batch size, one augmentation
   (kiln's `data=image_folder` default: a random resized crop keeping 80-100% of the area, then
   resize, scale to [0, 1], ImageNet mean/std), one worker count (kiln's `auto`, or --workers),
   on the CPU in 32-bit, with torch's default thread count in both training processes:

   (a) hand: a torch Dataset decoding each file with Pillow, then kiln's albumentations train
       transform (kiln.data.augment.train_transform, so the augmentation is identical), then a
       contiguous CHW float tensor, normalized; a DataLoader with the same workers (persistent,
       one torch/OpenCV thread each, as kiln's) and shuffle; the same net (backbone(), seeded as
       kiln seeds it), torch.optim.AdamW with conf/model/backbone.yaml's lr and weight decay on
       torch's default kernel; each epoch zero_grad/forward/loss/backward/step over the training
       split, then a no_grad pass over the validation split (eval transform, kiln's eval batch
       size, its own persistent workers), because kiln's epochs validate too. Nothing else.
   (b) kiln: the real CLI in a subprocess, `kiln train data=image_folder data.path=DIR
       model=backbone model.net.name=M trainer=cpu trainer.max_epochs=N export.after_training=false`
       (plus the shared size, batch size and, if given, workers), everything else kiln's default:
       callbacks (early stopping, best and last checkpoint), TensorBoard, per-epoch metrics,
       AdamW on torch's fused kernel, the cosine schedule.

   Both use the same split (kiln's datamodule, built here with the same config and seed, gives the
   hand loop its file lists). What is timed, the same way for both: each epoch from its start to
   the end of its validation (kiln: the seconds on its `epoch i/N ... (s)` lines in the run's
   train.log, which run from on_train_epoch_start to on_train_epoch_end, after validation and
   checkpointing). Images/s = training images x (N - 1) / seconds of epochs 2..N: epoch 1 is left
   out in both, since it starts the DataLoader workers and warms up the allocator; kiln's start-up
   (imports, set-up, sanity check) and its test of the best checkpoint are outside every epoch.
   Runs are interleaved hand, kiln, hand, ... (--rounds): each kiln run is divided by the mean of
   the hand runs before and after it (the machine is shared and its speed drifts), and R is the
   median over rounds. Target: R >= 0.9. The defaults (ResNet-18, 256 images of 64 x 64, batch 64,
   3 epochs, 1 round) fit a few minutes of a slow 2-core machine, so R rests on 2 epochs of 3
   steps each: expect +-10% from the machine alone; --rounds and --images make it steadier.

   Not in (a), printed beside it to read R by: what writing kiln's two checkpoints per epoch (best
   and last, each with the AdamW state: 3 x the weights) costs the hand loop's net in torch.save.

   Peak RSS of the kiln run: getrusage(RUSAGE_CHILDREN).ru_maxrss in a small launcher process
   that starts kiln and reaps it and (as a subreaper) any worker orphaned on the way: it covers
   kiln and its DataLoader workers, but it is the largest single process of that tree, not their
   sum. A sampler (every 0.2 s) also reads the whole tree's summed RSS and PSS (PSS divides the
   pages that forked workers share with kiln between them, so their sum is not counted twice).
   (Not wait4 on a child of this process: a child forked from a process that holds a trained
   ResNet starts with that RSS, and Linux records it in the child's ru_maxrss at exec.)

2. Memory. A folder of JPEG files whose decoded size (height x width x 3 bytes each) is 3x a
   memory limit (--memory-limit-mib, 1024 MiB) set on the kiln process and its workers together:
   a cgroup made for the run when this runs as root: v2 (memory.max, at the root of a cgroup2
   hierarchy whose subtree_control has the memory controller) or else v1 (memory.limit_in_bytes,
   a child of this process's own memory cgroup), removed afterwards; else RLIMIT_DATA set in the
   child (each process on its own, so it bounds every process, not their sum); else nothing
   (measured only). The output says which. The images are 320 x 320 (--memory-image-size): as
   cheap to write per decoded byte as 160 x 160 and 4x fewer files, so the run spends its time
   decoding rather than opening files: 10,486 files, 3 GiB decoded, 115 MiB on disk by default.
   kiln trains a tiny CNN on it (16 x 16 inputs, batch 256, 2 workers unless --workers) for one
   full epoch, so every training image is decoded once (--memory-batches limits the batches),
   then validates and tests every validation and test image. Reported: peak RSS as in 1 and the
   cgroup's peak usage (its charge: the page cache of the files read included, the shared
   libraries loaded earlier by other cgroups not). Target: the run completes under the limit
   (not OOM-killed) and its peak RSS < 1.5 GiB.

3. ONNX inference: a ResNet-18 (backbone(), 10 classes) exported by kiln's
   kiln.export.onnx_export.export_net (opset 20, float NCHW 64 x 64), batch 32: images/s in torch
   eager (no_grad, eval) and in onnxruntime fp32 (CPU provider), both with default threads, and the
   largest difference between their outputs.

The last line printed is exactly `kiln/hand=R rss_mib=M`, M being the peak RSS (MiB) of kiln's
throughput run as in 1; with --augment-only, `torchvision/albumentations=R`, R being the median
paired ratio of torchvision's quickest way in training, at the size where it does best.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

R_TARGET = 0.9
RSS_TARGET_MIB = 1536
CLASSES = 10
EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+)\b.*\((\d+(?:\.\d+)?) s\)\s*$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images in the throughput folder")
    parser.add_argument("--size", type=int, default=64, help="their size in pixels, and data.image_size")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; epochs 2..N are measured")
    parser.add_argument("--model", default="resnet18", help="model.net.name (kiln.models.backbones)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: kiln's auto)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="kiln runs, each between two hand runs")
    parser.add_argument("--skip-memory", action="store_true", help="skip the large-folder memory run")
    parser.add_argument("--memory-limit-mib", type=int, default=1024, help="the folder decodes to 3x this")
    parser.add_argument("--memory-image-size", type=int, default=320, help="pixels per side of its images")
    parser.add_argument(
        "--memory-batches", type=int, default=None, help="trainer.limit_train_batches of the memory run"
    )
    parser.add_argument(
        "--memory-enforce",
        choices=["auto", "cgroup", "rlimit", "none"],
        default="auto",
        help="how the memory limit is set (auto: a cgroup if possible, else RLIMIT_DATA)",
    )
    parser.add_argument("--skip-augment", action="store_true", help="skip the augmentation comparison")
    parser.add_argument(
        "--augment-only", action="store_true", help="only the augmentation comparison (about a minute)"
    )
    parser.add_argument("--augment-images", type=int, default=64, help="decoded images it times")
    parser.add_argument("--augment-rounds", type=int, default=7, help="its paired rounds")
    parser.add_argument("--skip-onnx", action="store_true", help="skip the ONNX inference part")
    parser.add_argument("--onnx-seconds", type=float, default=3.0, help="timing per engine, at least")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with images, runs and logs")
    parser.add_argument(
        "--depthwise",
        action="store_true",
        help="only the depthwise hard case of static int8 (--size, --epochs)",
    )
    parser.add_argument("--depthwise-model", default="mobilenetv3_small_050", help="its timm model")
    parser.add_argument(
        "--compression-run",
        type=Path,
        help="a run of experiment=images_resnet (compress.keep_variants=true): only its delivery, "
        "as scripts/benchmark_inference.py --images-run prints it",
    )
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: epoch 1 is not measured")
    if args.images < 10 * CLASSES:
        parser.error(
            f"--images must be >= {10 * CLASSES}: each split (70/15/15) needs each of the {CLASSES} classes"
        )
    return args


# -- image folders ------------------------------------------------------------------------------


def _class_pattern(label: int, size: int) -> np.ndarray:
    """A smooth uint8 pattern of its own per class: waves of a class-dependent frequency and colour."""
    grid = np.linspace(0.0, 2 * np.pi, size, dtype=np.float32)
    colour = np.array([1.0 + 0.2 * label, 0.6, 1.6 - 0.1 * label], dtype=np.float32)
    wave = np.sin((label + 1) * grid)[None, :] + np.cos((label % 4 + 1) * grid)[:, None]
    return np.clip(128 + 40 * wave[:, :, None] * colour, 0, 255).astype(np.uint8)


def _write_images(task: tuple[str, int, int, int, int]) -> int:
    """Writes images start..stop-1 of a folder: its class's pattern, shifted at random, with a
    random patch. Random-ish, cheap to make, and compressible (a few KB per JPEG)."""
    root, start, stop, size, seed = task
    patterns = [_class_pattern(label, size) for label in range(CLASSES)]
    patch = max(1, size // 4)
    for index in range(start, stop):
        label = index % CLASSES
        rng = np.random.default_rng((seed, index))
        pixels = np.roll(patterns[label], tuple(rng.integers(0, size, size=2)), axis=(0, 1))
        top, left = rng.integers(0, size - patch + 1, size=2)
        pixels[top : top + patch, left : left + patch] = rng.integers(0, 256, size=3, dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(Path(root) / str(label) / f"{index:07d}.jpg", quality=85)
    return stop - start


def write_folder(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` JPEG files in DIR/<class>/<n>.jpg, written by one process per CPU core."""
    for label in range(CLASSES):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    processes = max(1, os.cpu_count() or 1)
    step = max(1, -(-count // (processes * 8)))
    tasks = [(str(root), start, min(count, start + step), size, seed) for start in range(0, count, step)]
    with ProcessPoolExecutor(processes) as pool:
        written = sum(pool.map(_write_images, tasks))
    assert written == count
    return root


# -- memory of a process tree -------------------------------------------------------------------


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process and its descendants until stop()."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = self._tree()
            rss = pss = 0
            for pid in pids:
                fields = _smaps_rollup(pid)
                rss += fields.get("Rss", 0)
                pss += fields.get("Pss", 0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop_event.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree


def _smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, ... of one process in bytes (empty if it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


# -- memory limits for a child process ----------------------------------------------------------


class MemoryLimit:
    """A memory limit for one child command: a new cgroup (v2, else v1) holding the child and its
    workers, else RLIMIT_DATA set in the child (each process on its own), else none."""

    def __init__(self, limit_bytes: int, enforce: str) -> None:
        self.limit = limit_bytes
        self.kind = "none"
        self.cgroup: Path | None = None
        self.why = f"--memory-enforce={enforce}"
        if enforce in ("auto", "cgroup"):
            self._make_cgroup()
        if self.cgroup is None and enforce in ("auto", "rlimit"):
            self.kind = "rlimit"
        if enforce == "cgroup" and self.cgroup is None:
            raise SystemExit(f"--memory-enforce=cgroup: {self.why}")

    def describe(self) -> str:
        mib = self.limit / 2**20
        if self.kind == "cgroup v2":
            return f"cgroup v2 {self.cgroup} memory.max={mib:,.0f} MiB (kiln and its workers together)"
        if self.kind == "cgroup v1":
            return f"cgroup v1 {self.cgroup} memory.limit_in_bytes={mib:,.0f} MiB (kiln and its workers together)"
        if self.kind == "rlimit":
            return (
                f"RLIMIT_DATA={mib:,.0f} MiB per process (no cgroup: {self.why}); each worker has its own "
                "limit, so it bounds every process, not their sum"
            )
        return f"none, measured only ({self.why})"

    def _make_cgroup(self) -> None:
        if os.geteuid() != 0:
            self.why = "not root, cannot create a cgroup"
            return
        mounts = _cgroup_mounts()
        v2 = mounts.get("cgroup2")
        if v2 is not None and "memory" in _read(v2 / "cgroup.subtree_control").split():
            # at the root of the hierarchy: a cgroup with processes cannot have children with controllers
            self._create(v2 / f"kiln-benchmark-{os.getpid()}", "memory.max", "cgroup v2")
            return
        v1 = mounts.get("memory")
        if v1 is not None:
            own = next(
                (
                    line.split(":", 2)[2]
                    for line in _read(Path("/proc/self/cgroup")).splitlines()
                    if "memory" in line.split(":")[1].split(",")
                ),
                "/",
            )
            # under this process's own memory cgroup, so whatever accounts for it still sees the child
            self._create(
                v1 / own.lstrip("/") / f"kiln-benchmark-{os.getpid()}", "memory.limit_in_bytes", "cgroup v1"
            )
            return
        self.why = "no cgroup v2 with the memory controller enabled and no cgroup v1 memory hierarchy"

    def _create(self, path: Path, limit_file: str, kind: str) -> None:
        try:
            path.mkdir()
            (path / limit_file).write_text(str(self.limit))
        except OSError as exc:
            self.why = f"cannot create {path} ({exc.strerror})"
            if path.exists():
                _rmdir(path)
            return
        self.cgroup, self.kind = path, kind

    def wrap(self, command: list[str]) -> list[str]:
        """The command, moved into the cgroup first (by a shell that then execs it)."""
        if self.cgroup is None:
            return command
        return ["sh", "-c", f'echo $$ > {self.cgroup / "cgroup.procs"} && exec "$@"', "sh", *command]

    def preexec(self) -> Any:
        if self.kind != "rlimit":
            return None
        limit = self.limit

        def set_limit() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

        return set_limit

    def peak_and_oom(self) -> tuple[int | None, int | None]:
        """The cgroup's peak usage in bytes (None if unknown) and its OOM kills."""
        if self.cgroup is None:
            return None, None
        if self.kind == "cgroup v2":
            peak = _read(self.cgroup / "memory.peak").strip()
            events = dict(line.split() for line in _read(self.cgroup / "memory.events").splitlines() if line)
            return (int(peak) if peak.isdigit() else None), int(events.get("oom_kill", 0))
        peak = _read(self.cgroup / "memory.max_usage_in_bytes").strip()
        oom = dict(line.split() for line in _read(self.cgroup / "memory.oom_control").splitlines() if line)
        return (int(peak) if peak.isdigit() else None), int(oom.get("oom_kill", 0))

    def remove(self) -> None:
        if self.cgroup is not None:
            _rmdir(self.cgroup)


def _cgroup_mounts() -> dict[str, Path]:
    """'cgroup2' -> the v2 mount; 'memory' -> the v1 memory controller's mount."""
    found: dict[str, Path] = {}
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2":
            found.setdefault("cgroup2", Path(fields[4]))
        elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
            found.setdefault("memory", Path(fields[4]))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _rmdir(path: Path) -> None:
    for _ in range(50):  # a worker may still be exiting
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"  note: could not remove {path}", flush=True)


# -- the shared set-up: kiln's own config, split and transforms ----------------------------------


def kiln_overrides(args: argparse.Namespace, folder: Path) -> list[str]:
    """The data and model overrides of (b); (a) composes the same config."""
    overrides = [
        "data=image_folder",
        f"data.path={folder}",
        f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}",
        "model=backbone",
        f"model.net.name={args.model}",
        "trainer=cpu",
    ]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    return overrides


def load_setup(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from kiln.builder import build
    from kiln.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=kiln_overrides(args, folder))
    data = build("data", cfg.data, seed=cfg.seed)
    data.setup("fit")
    assert data.images is not None and data.splits is not None
    paths, labels = data.images.paths, data.images.labels
    return {
        "cfg": cfg,
        "data": data,
        "train": ([paths[i] for i in data.splits.train], labels[data.splits.train]),
        "val": ([paths[i] for i in data.splits.val], labels[data.splits.val]),
        "optimizer": {k: v for k, v in cfg.model.optimizer.items() if not k.startswith("_")},
    }


# -- (a) the hand-written loop ------------------------------------------------------------------


class FolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """A map-style torch Dataset: Pillow decode, albumentations transform, normalized CHW float."""

    def __init__(self, paths: list[Path], labels: Any, transform: Any, mean: Any, std: Any) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            pixels = np.asarray(image.convert("RGB"))
        pixels = self.transform(image=pixels)["image"]
        # contiguous CHW, as torchvision's ToTensor gives (a permuted view would make the batch
        # channels_last, and convolutions on CPU several times slower)
        x = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[index])


def _worker_init(worker_id: int) -> None:
    """As kiln's workers: one torch thread and no OpenCV threads, so workers do not fight."""
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(0)
    except ImportError:
        pass


def run_hand(setup: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from torch import nn
    from torch.utils.data import DataLoader

    from kiln.data.augment import eval_transform, train_transform
    from kiln.models.backbones import backbone

    data, cfg = setup["data"], setup["cfg"]
    workers = data.num_workers

    def loader(split: str, transform: Any, batch_size: int, shuffle: bool) -> DataLoader[Any]:
        paths, labels = setup[split]
        return DataLoader(
            FolderDataset(paths, labels, transform, data.mean, data.std),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
        )

    train = loader("train", train_transform(data.image_size, data.augment), data.settings.batch_size, True)
    val = loader("val", eval_transform(data.image_size), data.settings.eval_batch_size, False)
    torch.manual_seed(cfg.seed)
    net = backbone(data.input_shape, data.num_outputs, name=args.model)
    optimizer = torch.optim.AdamW(net.parameters(), **setup["optimizer"])
    loss_fn = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        net.train()
        for x, y in train:
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((net(x).argmax(dim=1) == y).sum())
        seconds.append(time.perf_counter() - started)
    rows = len(setup["train"][0])
    # not part of (a): what writing kiln's two checkpoints each epoch (best and last: weights and
    # optimizer state) costs this net, to read the ratio by
    started = time.perf_counter()
    for name in ("best", "last"):
        torch.save({"state_dict": net.state_dict(), "optimizer": optimizer.state_dict()}, work / f"{name}.pt")
    checkpoint_seconds = time.perf_counter() - started
    checkpoint_bytes = sum((work / f"{name}.pt").stat().st_size for name in ("best", "last"))
    return {
        "epoch_seconds": seconds,
        "images_per_second": rows * (len(seconds) - 1) / sum(seconds[1:]),
        "val_acc": correct / len(setup["val"][0]),
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoint_bytes": checkpoint_bytes,
    }


# -- (b) kiln, the real CLI ---------------------------------------------------------------------


def kiln_command() -> list[str]:
    script = Path(sys.executable).with_name("kiln")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kiln"]


# Runs argv[2:] and writes getrusage(RUSAGE_CHILDREN).ru_maxrss (KiB) to argv[1]: the peak RSS of
# the largest one process of that command's tree. Why not wait4 on kiln from here: a child forked
# from this process carries this process's RSS (the hand loop's ResNet) into its own ru_maxrss at
# exec. As a subreaper it also adopts and reaps workers orphaned by their parent, so they count too.
RUSAGE_LAUNCHER = """
import ctypes, os, resource, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.call(sys.argv[2:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_kiln(work: Path, name: str, overrides: list[str], limit: MemoryLimit | None = None) -> dict[str, Any]:
    """`kiln train ...` in a subprocess: its epoch seconds, run.json and memory."""
    output_dir = work / name
    rusage = work / f"{name}.maxrss"
    command = [
        sys.executable,
        "-c",
        RUSAGE_LAUNCHER,
        str(rusage),
        *kiln_command(),
        "train",
        *overrides,
        "export.after_training=false",
        f"paths.output_dir={output_dir}",
    ]
    log = work / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            limit.wrap(command) if limit else command,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit.preexec() if limit else None,
        )
        sampler = TreeMemory(process.pid)
        sampler.start()
        process.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    maxrss = rusage.read_text().strip() if rusage.exists() else ""
    result: dict[str, Any] = {
        "returncode": process.returncode,
        "wall_seconds": wall,
        "ru_maxrss": int(maxrss) * 1024 if maxrss.isdigit() else 0,  # KiB on Linux
        "tree_rss": sampler.peak_rss,
        "tree_pss": sampler.peak_pss,
        "processes": sampler.peak_processes,
        "log": log,
    }
    runs = sorted(output_dir.glob("train/*/run.json"))
    if process.returncode != 0 or not runs:
        result["tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        return result
    run_dir = runs[0].parent
    record = json.loads(runs[0].read_text())
    seconds: dict[int, float] = {}
    for line in (run_dir / "train.log").read_text(errors="replace").splitlines():
        match = EPOCH_LINE.search(line)
        if match:
            seconds[int(match.group(1))] = float(match.group(3))
    result.update(
        run=record,
        epoch_seconds=[seconds[epoch] for epoch in sorted(seconds)],
        train_rows=record["throughput"]["train_rows"],
    )
    return result


def throughput_part(args: argparse.Namespace, work: Path) -> tuple[float, int]:
    folder = write_folder(work / "images", args.images, args.size)
    setup = load_setup(args, folder)
    data = setup["data"]
    if not args.skip_augment:
        augmentation_part(args, folder, data)
    rows = len(setup["train"][0])
    print(
        f"1. throughput: {args.model} on {args.images} JPEG files {args.size}x{args.size} ({rows} train, "
        f"{len(setup['val'][0])} val), batch {args.batch_size}, {data.num_workers} worker(s), "
        f"augment crop_scale={list(data.augment['crop_scale'] or [])}, {args.epochs} epochs, "
        f"measured over epochs 2..{args.epochs}",
        flush=True,
    )
    hand: list[float] = []
    kiln: list[float] = []
    peaks: list[dict[str, Any]] = []

    def measure_hand() -> None:
        result = run_hand(setup, args, work)
        hand.append(result["images_per_second"])
        epochs = ", ".join(f"{s:.1f}" for s in result["epoch_seconds"])
        print(
            f"  (a) hand  {hand[-1]:8.1f} images/s  (epoch seconds {epochs}; saving two checkpoints like "
            f"kiln's, {result['checkpoint_bytes'] / 2**20:,.0f} MiB, would add {result['checkpoint_seconds']:.1f} s "
            "an epoch)",
            flush=True,
        )

    measure_hand()
    for round_index in range(args.rounds):
        result = run_kiln(
            work, f"kiln{round_index}", [*kiln_overrides(args, folder), f"trainer.max_epochs={args.epochs}"]
        )
        if result["returncode"] != 0 or "epoch_seconds" not in result:
            raise SystemExit(f"kiln train failed (exit {result['returncode']}):\n{result.get('tail', '')}")
        seconds = result["epoch_seconds"]
        if len(seconds) < 2 or result["train_rows"] != rows:
            raise SystemExit(
                f"kiln's run does not match: epoch seconds {seconds}, train rows {result['train_rows']}"
            )
        kiln.append(rows * (len(seconds) - 1) / sum(seconds[1:]))
        peaks.append(result)
        fit = result["run"]["throughput"]
        print(
            f"  (b) kiln  {kiln[-1]:8.1f} images/s  (epoch seconds {', '.join(f'{s:.1f}' for s in seconds)}; "
            f"whole fit incl. start-up {fit['train_samples_per_second']} images/s; process wall "
            f"{result['wall_seconds']:.0f} s)",
            flush=True,
        )
        measure_hand()
    ratios = [k / ((hand[i] + hand[i + 1]) / 2) for i, k in enumerate(kiln)]
    ratio = statistics.median(ratios)
    print(
        f"  kiln/hand {ratio:.3f} (per round {', '.join(f'{r:.3f}' for r in ratios)}; each kiln run over the "
        f"mean of the hand runs around it): target >= {R_TARGET} {'met' if ratio >= R_TARGET else 'NOT MET'}"
    )
    peak = max(peaks, key=lambda p: p["ru_maxrss"])
    print(
        f"  kiln peak RSS: {peak['ru_maxrss'] / 2**20:,.0f} MiB (ru_maxrss: the largest one process of kiln "
        f"and its workers); whole tree summed, sampled: RSS {peak['tree_rss'] / 2**20:,.0f} MiB, PSS "
        f"{peak['tree_pss'] / 2**20:,.0f} MiB over up to {peak['processes']} processes",
        flush=True,
    )
    return ratio, peak["ru_maxrss"]


# -- 0. augmentation: albumentations against torchvision's transforms.v2 -------------------------


def decoded_images(folder: Path, count: int, shape: tuple[int, int] | None = None) -> list[np.ndarray]:
    """`count` images of the folder decoded as kiln's workers decode them (uint8 height x width x
    RGB); with `shape` (height, width), resized to it first: photo-sized inputs."""
    images = []
    for path in sorted(folder.rglob("*.jpg"))[:count]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if shape is not None:
                rgb = rgb.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
            images.append(np.array(rgb, dtype=np.uint8))  # writable, as torch.from_numpy wants
    return images


def augmentation_pipelines(
    size: tuple[int, int], augment: dict[str, Any], mean: Any, std: Any, *, train: bool
) -> dict[str, tuple[Any, Any]]:
    """name -> (prepare, transform): `prepare` turns a decoded array into the pipeline's input
    (outside the timing: a worker gets either from the decoder), `transform` gives the normalized
    contiguous float CHW tensor a batch is stacked from. The same augmentation in each:
    albumentations is kiln's own (kiln.data.augment + kiln.data.images.to_tensor); torchvision's
    are written three ways a user writes them."""
    from torchvision.transforms import v2

    from kiln.data.augment import eval_transform, train_transform
    from kiln.data.images import to_tensor

    unsupported = [key for key in ("color_jitter", "policy", "extra") if augment[key]]
    if unsupported:
        raise SystemExit(f"the augmentation comparison covers crop and flip only, not {unsupported}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    kiln = train_transform(size, augment) if train else eval_transform(size)

    def torchvision(antialias: bool) -> Any:
        # antialias=False on tensors: OpenCV's INTER_LINEAR (albumentations) does not antialias
        # either, and it is torchvision's quicker setting; Pillow always antialiases
        if train and augment["crop_scale"] is not None:
            scale = tuple(float(s) for s in augment["crop_scale"])
            steps: list[Any] = [v2.RandomResizedCrop(size, scale=scale, antialias=antialias)]
        else:
            steps = [v2.Resize(size, antialias=antialias)]
        if train and augment["horizontal_flip"]:
            steps.append(v2.RandomHorizontalFlip(float(augment["horizontal_flip"])))
        return steps

    def finish() -> list[Any]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]

    def contiguous(steps: list[Any]) -> Any:
        # a resized uint8 tensor can come out channels_last, and so would the batch stacked from
        # it (convolutions several times slower on CPU): contiguous, as kiln's to_tensor makes it
        compose = v2.Compose(steps)
        return lambda x: compose(x).contiguous()

    return {
        "albumentations (kiln)": (
            lambda pixels: pixels,
            lambda p: to_tensor(kiln(image=p)["image"], mean_t, std_t),
        ),
        "torchvision ToImage": (
            lambda pixels: pixels,
            contiguous([v2.ToImage(), *torchvision(False), *finish()]),
        ),
        "torchvision HWC view": (
            lambda pixels: torch.from_numpy(pixels).permute(2, 0, 1),
            contiguous(torchvision(False) + finish()),
        ),
        "torchvision on PIL": (
            lambda pixels: Image.fromarray(pixels),
            contiguous([*torchvision(True), v2.ToImage(), *finish()]),
        ),
    }


class OneThread:
    """torch and OpenCV on one thread inside the block, as in kiln's DataLoader workers."""

    def __enter__(self) -> None:
        import cv2

        self.torch_threads, self.cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(0)

    def __exit__(self, *exc: object) -> None:
        import cv2

        torch.set_num_threads(self.torch_threads)
        cv2.setNumThreads(self.cv2_threads)


def time_pipelines(
    pipelines: dict[str, tuple[Any, Any]], images: list[np.ndarray], rounds: int
) -> dict[str, list[float]]:
    """Microseconds per image of each pipeline in each round. A round runs every pipeline once over
    all images, in an order that rotates from round to round, so drift in the machine's speed
    falls on each of them alike."""
    inputs = {name: [prepare(pixels) for pixels in images] for name, (prepare, _) in pipelines.items()}
    names = list(pipelines)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first calls build kernels and caches
        pipelines[name][1](inputs[name][0])
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            transform = pipelines[name][1]
            started = time.perf_counter()
            for item in inputs[name]:
                transform(item)
            times[name].append((time.perf_counter() - started) / len(images) * 1e6)
    return times


def same_output(pipelines: dict[str, tuple[Any, Any]], image: np.ndarray, std: Any) -> float:
    """The largest difference, in grey levels, between albumentations' evaluation output and
    torchvision's on tensors (no random step: a check that both compute the same thing)."""
    outputs = [transform(prepare(image)) for prepare, transform in list(pipelines.values())[:2]]
    scale = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255
    return float(((outputs[0] - outputs[1]).abs() * scale).max())


def augmentation_part(args: argparse.Namespace, folder: Path, data: Any) -> float:
    """Per-image time of kiln's augmentation in albumentations and in torchvision's transforms.v2,
    in paired rounds on one thread. Prints both, and returns the median ratio (over rounds) of the
    quickest torchvision way to albumentations in training, at the size where torchvision does
    best: above 1, albumentations is quicker at every size measured."""
    cases = [
        (f"{args.size}x{args.size} -> {args.size}", None, data.image_size),
        ("375x500 -> 224 (photo-sized)", (375, 500), (224, 224)),
    ]
    print(
        f"0. augmentation: kiln's data.augment (crop_scale={list(data.augment['crop_scale'] or [])}, "
        f"horizontal_flip={data.augment['horizontal_flip']}), then float and mean/std; on one thread, "
        f"{args.augment_images} decoded images, {args.augment_rounds} paired rounds: microseconds per "
        "image (median), and each way's time over albumentations' in the same round (median [min, max])",
        flush=True,
    )
    best_ratios = []
    for label, shape, size in cases:
        images = decoded_images(folder, args.augment_images, shape)
        for train in (True, False):
            pipelines = augmentation_pipelines(size, data.augment, data.mean, data.std, train=train)
            with OneThread():
                times = time_pipelines(pipelines, images, args.augment_rounds)
            line, ratio = describe_times(times)
            print(f"  {label}, {'train' if train else 'eval '}: {line}", flush=True)
            if train:
                best_ratios.append(ratio)
        with OneThread():
            evaluation = augmentation_pipelines(size, data.augment, data.mean, data.std, train=False)
            difference = same_output(evaluation, images[0], data.std)
        print(
            f"    evaluation outputs, albumentations against torchvision on tensors: <= {difference:.1f} grey levels apart"
        )
    ratio = min(best_ratios)
    quicker = "albumentations" if ratio > 1 else "torchvision transforms.v2"
    print(
        f"  the quickest torchvision way over albumentations in training: {ratio:.2f}x at best; "
        f"{quicker} is quicker, and kiln uses albumentations",
        flush=True,
    )
    return ratio


def describe_times(times: dict[str, list[float]]) -> tuple[str, float]:
    """One line of per-image times and paired ratios, and the quickest torchvision way's ratio."""
    names = list(times)
    baseline = times[names[0]]
    parts = [f"{names[0]} {statistics.median(baseline):,.0f} us"]
    ratios = {}
    for name in names[1:]:
        paired = [value / base for value, base in zip(times[name], baseline, strict=True)]
        ratios[name] = statistics.median(paired)
        parts.append(
            f"{name} {statistics.median(times[name]):,.0f} us ({ratios[name]:.2f}x [{min(paired):.2f}, {max(paired):.2f}])"
        )
    return "; ".join(parts), min(ratios.values())


# -- 2. memory on a folder larger than the limit -------------------------------------------------


def memory_part(args: argparse.Namespace, work: Path) -> None:
    limit_bytes = args.memory_limit_mib * 2**20
    size = args.memory_image_size
    count = -(-3 * limit_bytes // (size * size * 3))
    started = time.perf_counter()
    folder = write_folder(work / "large", count, size, seed=1)
    on_disk = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    print(
        f"2. memory: {count:,} JPEG files {size}x{size}, decoded {count * size * size * 3 / 2**30:.2f} GiB "
        f"(3x the limit), {on_disk / 2**20:,.0f} MiB on disk, written in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    limit = MemoryLimit(limit_bytes, args.memory_enforce)
    print(f"  limit: {limit.describe()}", flush=True)
    overrides = [
        "data=image_folder",
        f"data.path={folder}",
        "data.image_size=16",
        "data.batch_size=256",
        "model=cnn",
        "model.net.channels=[4]",
        "model.net.hidden_size=16",
        "trainer=cpu",
        "trainer.max_epochs=1",
    ]
    overrides.append(f"data.num_workers={args.workers if args.workers is not None else 2}")
    if args.memory_batches is not None:
        overrides.append(f"+trainer.limit_train_batches={args.memory_batches}")
    try:
        result = run_kiln(work, "kiln_memory", overrides, limit)
        cgroup_peak, oom_kills = limit.peak_and_oom()
    finally:
        limit.remove()
    rss = result["ru_maxrss"]
    finished = result["returncode"] == 0 and "run" in result
    print(
        f"  kiln train, 1 epoch of a tiny CNN: exit {result['returncode']}, {result['wall_seconds']:.0f} s; "
        f"peak RSS {rss / 2**20:,.0f} MiB (ru_maxrss, largest one process); whole tree summed, sampled: RSS "
        f"{result['tree_rss'] / 2**20:,.0f} MiB, PSS {result['tree_pss'] / 2**20:,.0f} MiB"
        + (f"; cgroup peak usage {cgroup_peak / 2**20:,.0f} MiB (page cache included)" if cgroup_peak else "")
        + (f"; OOM kills {oom_kills}" if oom_kills is not None else ""),
        flush=True,
    )
    if finished:
        print(f"  trained on {result['train_rows']:,} images (every one decoded unless --memory-batches)")
    else:
        print(f"  the run FAILED:\n{result.get('tail', '')}")
    met = finished and rss < RSS_TARGET_MIB * 2**20
    print(
        f"  target: finishes under the limit, peak RSS < {RSS_TARGET_MIB} MiB: {'met' if met else 'NOT MET'}"
    )


# -- 3. ONNX inference ---------------------------------------------------------------------------


def onnx_part(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from kiln.export.onnx_export import export_net
    from kiln.models.backbones import backbone

    torch.manual_seed(0)
    net = backbone((3, 64, 64), CLASSES, name="resnet18").eval()
    example = torch.randn(32, 3, 64, 64)
    model = export_net(net, example, opset=20)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = example.numpy()

    def rate(step: Any) -> float:
        step()  # warm-up
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < args.onnx_seconds:
            step()
            runs += 1
        return 32 * runs / (time.perf_counter() - started)

    with torch.no_grad():
        eager = rate(lambda: net(example))
        expected = net(example).numpy()
    onnx = rate(lambda: session.run(None, {name: batch}))
    difference = float(np.abs(session.run(None, {name: batch})[0] - expected).max())
    print(
        f"3. ONNX ResNet-18, float NCHW 64x64, batch 32: torch eager {eager:,.0f} images/s, onnxruntime fp32 "
        f"{onnx:,.0f} images/s (ort/eager {onnx / eager:.2f}; largest output difference {difference:.1e})",
        flush=True,
    )
    # the variants kiln's compression tries, measured the same way (untrained weights: speed only)
    rates = {"fp32": onnx, **compressed_rates(net, example, rate)}
    shown = ", ".join(
        f"{variant} {value:,.0f} images/s ({value / onnx:.2f}x fp32)" for variant, value in rates.items()
    )
    print(f"   onnxruntime variants, batch 32: {shown}", flush=True)


def compressed_rates(net: Any, example: torch.Tensor, rate: Any) -> dict[str, float]:
    """Images/s of static QDQ int8 (calibrated on 4 random batches), structured pruning at 0.5,
    and both: the candidates of compress=auto that change speed on CPU."""
    import tempfile

    import onnx as onnx_lib
    import onnxruntime as ort

    from kiln.compression.pruning import prune_structured
    from kiln.compression.quantization import quantize_static
    from kiln.export.onnx_export import export_net

    generator = np.random.default_rng(0)
    calibration = [generator.standard_normal(example.shape).astype(np.float32) for _ in range(4)]
    batch = example.numpy()
    pruned = prune_structured(net, tuple(example.shape[1:]), 0.5).eval()
    rates = {}
    with tempfile.TemporaryDirectory(prefix="kiln-benchmark-") as temp:
        for variant, source_net, int8 in (
            ("int8_static", net, True),
            ("pruned", pruned, False),
            ("pruned_int8_static", pruned, True),
        ):
            fp32_path = Path(temp) / f"{variant}-fp32.onnx"
            onnx_lib.save(export_net(source_net, example, opset=20), str(fp32_path))
            path = fp32_path
            if int8:
                path = Path(temp) / f"{variant}.onnx"
                quantize_static(fp32_path, path, "input", calibration)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            rates[variant] = rate(lambda session=session: session.run(None, {"input": batch}))
    return rates


# -- the benchmark ------------------------------------------------------------------------------


def compression_part(run: Path) -> int:
    """The ResNet's delivery: shipped variant, speed-up over onnxruntime fp32 at batch 256 with its
    interval (timed here side by side), the accuracy drop's upper end, compress_export_s and train_s
    (scripts/benchmark_inference.py describe_delivery)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_inference import describe_delivery

    print(describe_delivery(run))
    return 0


# -- the depthwise hard case of static int8 (issue 25) ------------------------------------------


def depthwise_part(args: argparse.Namespace) -> int:
    """timm's MobileNetV3-Small (width 0.5, depthwise convolutions, from scratch) on the digit
    images at --size pixels for --epochs epochs, delivered by compress=auto: what shipped, its
    speed-up over ORT fp32 at batch 256 with its interval, the upper end of its accuracy drop,
    compress_export_s and train_s, and static int8's attempts (calibration, layers kept in fp32)."""
    work = Path(tempfile.mkdtemp(prefix="kiln-benchmark-depthwise-"))
    overrides = [
        "data=digit_images",
        f"data.size={args.size}",
        "model=backbone",
        f"model.net.name={args.depthwise_model}",
        f"trainer.max_epochs={args.epochs}",
        "monitor.metric=val/acc",
        "monitor.mode=max",
        "compress=auto",
        "compress.quantize_static.calibration=[minmax,percentile]",
        "progress=lines",
        f"run_dir={work / 'run'}",
    ]
    env = {**os.environ, "KILN_CACHE_DIR": os.environ.get("KILN_CACHE_DIR", str(work / "cache"))}
    print("kiln train " + " ".join(overrides[:-1]), flush=True)
    try:
        subprocess.run([*kiln_command(), "train", *overrides], check=True, cwd=work, env=env)
        print(describe_depthwise(json.loads((work / "run" / "report.json").read_text())))
    finally:
        if args.keep:
            print(f"run kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def describe_depthwise(report: dict[str, Any]) -> str:
    """The delivery in a few labelled lines, then one line per static int8 attempt."""
    shipped = next(v for v in report["variants"] if v["name"] == report["shipped"])
    speedup = (shipped.get("speedup") or {}).get("256") or {}
    interval = shipped.get("drop_ci95")
    timings = report["timings_s"]
    lines = [
        f"shipped={report['shipped']} speedup_b256={speedup.get('median', 1.0)}x {speedup.get('ci95')} "
        f"drop_upper={interval[1] if interval else shipped['val_drop']} ({report['gate']['metric']}, "
        f"{report['metric_unit']}) compress_export_s={timings['compress_export']} train_s={timings.get('train')}",
        f"reason: {report['reason']}",
        *(f"verdict: {line}" for line in report["verdicts"].values()),
        *(f"abandoned {a['name']}: {a['abandoned']}" for a in report.get("abandoned", [])),
    ]
    for variant in [*report["variants"], *report.get("abandoned", [])]:
        search = variant.get("int8_search")
        if not search:
            continue
        lines.append(f"{variant['name']} int8 search: {search['outcome']}")
        for row in search["attempts"]:
            lines.append(
                f"  {row['calibration']}; fp32: {', '.join(row['kept_fp32']) or 'none'}; drop {row['val_drop']:.2f} "
                f"{row['drop_ci95']}; speed-up {(row['speedup'].get('256') or {}).get('median', 'not timed')} "
                f"{(row['speedup'].get('256') or {}).get('ci95', '')}; {row['verdict']}"
            )
    cpu = report.get("cpu") or {}
    lines.append(f"cpu: {cpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.depthwise:
        return depthwise_part(args)
    if args.compression_run:
        return compression_part(args.compression_run)
    work = Path(tempfile.mkdtemp(prefix="kiln-benchmark-images-"))
    os.environ.setdefault("KILN_CACHE_DIR", str(work / "cache"))
    try:
        if args.augment_only:
            folder = write_folder(work / "images", args.images, args.size)
            augment_ratio = augmentation_part(args, folder, load_setup(args, folder)["data"])
            print(f"torchvision/albumentations={augment_ratio:.2f}")
            return 0
        ratio, rss = throughput_part(args, work)
        if not args.skip_memory:
            memory_part(args, work)
        if not args.skip_onnx:
            onnx_part(args)
    finally:
        if args.keep:
            print(f"images, runs and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"kiln/hand={ratio:.3f} rss_mib={rss / 2**20:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
