import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

DATA_COMMANDS = ["mnist_bench.reproduce", "mnist_bench.throughput", "study.depth"]
COMMANDS = [*DATA_COMMANDS, "study.report"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module):
    p = run(module, "--help")
    assert p.returncode == 0 and "--out" in p.stdout and "usage:" in p.stdout


@pytest.mark.parametrize("module", COMMANDS)
@pytest.mark.parametrize("bad", [["--seeds", "0"], ["--threads", "-1"], ["--no-such-flag"]])
def test_bad_argument_exits_2_without_traceback(module, bad):
    p = run(module, *bad)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module", DATA_COMMANDS)
def test_corrupted_data_fails_fast_with_one_line(module, data_copy: Path, tmp_path: Path):
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    p = run(module, "--data-dir", str(data_copy), "--out", str(tmp_path / "out"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "t10k-labels-idx1-ubyte" in p.stderr
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_usage_error(tmp_path: Path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    p = run("mnist_bench.reproduce", "--device", "cuda", "--out", str(tmp_path))
    assert p.returncode == 2 and "CUDA" in p.stderr and "Traceback" not in p.stderr


def test_reproduce_writes_table(tmp_path: Path):
    p = run("mnist_bench.reproduce", "--seeds", "1", "--train-subset", "500", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(tmp_path / "reproduction.csv")
    assert {"experiment", "seed", "epochs", "test_accuracy", "test_loss", "claimed_accuracy",
            "train_seconds", "torch_version", "device", "device_name", "threads"} <= set(df.columns)
    assert len(df) == 3 and df["test_accuracy"].between(0, 1).all()


def test_throughput_quick_writes_documented_columns(tmp_path: Path, monkeypatch):
    from mnist_bench import throughput

    # Structural check on a reduced grid (the real sweep is `python -m mnist_bench.throughput`).
    monkeypatch.setattr(throughput, "BATCH_SIZES", (64, 256))
    monkeypatch.setattr(throughput, "DEPTHS", (1, 4))
    tiny = throughput.Timing(warmup_seconds=0.01, min_seconds=0.01, repeats=2)
    df = throughput.sweep([throughput.torch.device("cpu")], [1], tiny, None, log=lambda s: None)
    assert {"pipeline", "model", "depth", "batch_size", "device", "threads", "samples_per_s", "ms_per_step",
            "gflops", "peak_gflops", "torch_version", "cpu", "gpu"} <= set(df.columns)
    assert set(df.pipeline) == {"harness", "source-dataloader"}
    assert len(df[df.pipeline == "harness"]) == 2 * 2 + 2  # grid plus two optimizer variants
    assert (df.samples_per_s > 0).all() and (df.peak_gflops > 0).all()
    assert "harness / source" in throughput.summary(df)
