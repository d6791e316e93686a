"""Fixtures shared by the whole suite.

`tiny_tokenizer_dir` / `tiny_tokenizer`: a randomly initialised (seed 0) VQGAN with
the architecture of configs/vqgan_tiny.yaml: 64x64 images, f=16, 16 tokens per
image, 8192 codes. Stages downstream of the tokenizer test against it.
`one_thread` (autouse, session): one intra-op thread for the whole suite.
`fake_lpips_weights`: (vgg16, linear) files in the formats LPIPS reads, random values.
`deny_listing`: makes folders unlistable, as mode 000 does for anyone but root (the suite may run as root).
`cpu_suite`, `cpu_unless_marked_gpu` (autouse): the suite means the same on a GPU workstation or inside a torchrun
/ srun allocation as on a CPU-only machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import tokenizer

TINY_CONFIG_YAML = Path(__file__).resolve().parents[1] / "configs" / "vqgan_tiny.yaml"


def tiny_vqgan_config() -> tokenizer.VQGANConfig:
    """The tokenizer section of configs/vqgan_tiny.yaml as a VQGANConfig."""
    section = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG_YAML).model.init_args.tokenizer)
    return tokenizer.VQGANConfig(**section)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with config.json + model.safetensors of the tiny random tokenizer (same weights every run)."""
    torch.manual_seed(0)
    return tokenizer.VQTokenizer(tiny_vqgan_config()).save(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> tokenizer.VQTokenizer:
    """The tiny tokenizer loaded through `tokenizer.load`, on CPU, eval mode."""
    return tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite, in-process and in subprocesses (OMP_NUM_THREADS).

    The tests' tensors are tiny, so a second thread only adds contention: on a shared 2-core machine
    OpenMP threads spinning against other jobs made a tiny VQGAN step 10x slower (0.25 s vs 2-8 s)
    and tiny decode steps ~12x slower. The other cores go to more tests: `make test` runs one pytest-xdist worker per
    core.
    """
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


REAL_CUDA = {"is_available": torch.cuda.is_available, "device_count": torch.cuda.device_count}


@pytest.fixture(scope="session", autouse=True)
def cpu_suite() -> Iterator[None]:
    """The suite runs on the CPU wherever it runs, fixtures of any scope included; only tests marked `gpu` see CUDA
    (`cpu_unless_marked_gpu`). The commands default to CUDA, in bfloat16, when it is there, and the tests compare
    their output exactly with float32 values computed on the CPU: on a GPU machine they would fail or pass by luck,
    and would not be the CPU counterparts of the `gpu` tests.

    A shell inside `torchrun` or `srun` has rank variables that the multi-GPU commands read (`lvm.tokenize` would
    take only its rank's share of the shards): they are removed too; the tests that want ranks set their own."""
    if torch.cuda.is_available():
        # Started now, with the GPUs visible: CUDA reads CUDA_VISIBLE_DEVICES once, when it starts, and a CPU test
        # can start it (torch.compile asks for the current device), with none visible (`cpu_unless_marked_gpu`),
        # which would leave every later `gpu` test of the session without a GPU.
        torch.cuda.init()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.cuda, "device_count", lambda: 0)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            patch.delenv(name, raising=False)
        for name in [name for name in os.environ if name.startswith("SLURM_")]:
            patch.delenv(name)
        yield


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `gpu` test sees the real CUDA; any other test's subprocesses see no GPU either (the variable does not reach
    this process's CUDA, started in `cpu_suite`)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    else:
        for name, real in REAL_CUDA.items():
            monkeypatch.setattr(torch.cuda, name, real)


def next_batch_after_stop_signals_to_the_worker(loader: DataLoader) -> Any:
    """Start `loader` (one worker), send its worker SIGTERM and Ctrl-C as a scheduler or terminal signalling the
    whole process group would, check the worker lives on, and return the next batch (the stop is the main
    process's to make; a killed worker would end the step with a traceback)."""
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert worker.is_alive()
    batch = next(batches)
    del batches
    return batch


@pytest.fixture(scope="session")
def fake_lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random VGG16 features (torchvision's key layout) and LPIPS heads (`lin{k}.model.1.weight`)."""
    from torchvision.models.vgg import cfgs, make_layers

    out = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, out / "vgg16.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, out / "vgg.pth")
    return out / "vgg16.pth", out / "vgg.pth"


@pytest.fixture
def deny_listing(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """`deny_listing(folder)`: listing the folder (os.scandir, which os.walk uses) raises PermissionError."""
    denied: set[str] = set()
    scandir = os.scandir

    def guarded(path=".") -> object:
        if os.path.normpath(os.fspath(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    return lambda folder: denied.add(os.path.normpath(folder))
