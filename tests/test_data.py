import gzip
import shutil
from pathlib import Path

import pytest
import torch

from mnist_bench.data import FILES, SHA256, DataError, load_mnist, load_raw, split_indices


def test_pinned_data_loads_with_official_shapes_and_counts():
    raw = load_raw()
    assert raw["train-images-idx3-ubyte"].shape == (60000, 28, 28)
    assert raw["t10k-images-idx3-ubyte"].shape == (10000, 28, 28)
    assert raw["train-images-idx3-ubyte"].dtype == torch.uint8
    counts = torch.bincount(raw["t10k-labels-idx1-ubyte"].long()).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_normalisation_matches_published_mean(mnist):
    full = torch.cat([mnist.train_x, mnist.val_x])
    assert full.dtype == torch.float32 and full.shape == (60000, 784)
    assert 0.0 <= full.min() and full.max() <= 1.0
    assert abs(full.double().mean().item() - 0.1306604762738429) < 1e-6


def test_standardised_copy_has_zero_mean_unit_spread_on_training_pixels_only(small):
    z = small.standardised()
    assert abs(z.train_x.mean().item()) < 1e-5 and abs(z.train_x.std().item() - 1) < 1e-5
    mean, std = small.train_x.mean(), small.train_x.std()
    assert torch.allclose(z.test_x, (small.test_x - mean) / std)  # the test set scaled by training statistics
    assert torch.equal(z.train_y, small.train_y) and torch.equal(z.test_y, small.test_y)
    assert 0.0 <= small.train_x.min()  # the original is untouched


def test_split_sizes_and_disjointness(mnist):
    assert len(mnist.train_x) == 50000 and len(mnist.val_x) == 10000 and len(mnist.test_x) == 10000
    train_idx, val_idx = split_indices(60000, 10000, seed=0)
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == 60000
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    # And the loaded images really are those rows.
    raw = load_raw()["train-images-idx3-ubyte"]
    assert torch.equal(mnist.val_x[:50].mul(255).round().byte(), raw[val_idx[:50]].reshape(50, -1))


def test_split_is_seeded_and_zero_validation_trains_on_everything():
    a, b = load_mnist(val_size=100, split_seed=3), load_mnist(val_size=100, split_seed=3)
    assert torch.equal(a.val_x, b.val_x)
    assert not torch.equal(a.val_x, load_mnist(val_size=100, split_seed=4).val_x)
    full = load_mnist(val_size=0)
    assert len(full.train_x) == 60000 and len(full.val_x) == 0


def test_train_subset_cuts_training_only():
    d = load_mnist(val_size=500, train_subset=1000)
    assert (len(d.train_x), len(d.val_x), len(d.test_x)) == (1000, 500, 10000)


def test_raw_and_torchvision_layouts(data_copy: Path, tmp_path: Path):
    raw_dir = tmp_path / "tv" / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in FILES:  # decompressed, in torchvision's layout
        (raw_dir / name).write_bytes(gzip.decompress((data_copy / f"{name}.gz").read_bytes()))
    assert torch.equal(
        load_raw(tmp_path / "tv")["t10k-labels-idx1-ubyte"], load_raw(data_copy)["t10k-labels-idx1-ubyte"]
    )


def _assert_one_line_naming(exc: pytest.ExceptionInfo, name: str):
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and SHA256[name] in msg


def _flip_byte(raw: bytes) -> bytes:
    altered = bytearray(gzip.decompress(raw))
    altered[5000] ^= 0xFF
    return gzip.compress(bytes(altered))


def _garble_deflate(raw: bytes) -> bytes:
    garbled = bytearray(raw)
    for i in range(200, 260):  # inside the deflate stream: zlib.error, not a checksum mismatch
        garbled[i] ^= 0xFF
    return bytes(garbled)


CORRUPTIONS = {
    "garbled-deflate-stream": ("t10k-labels-idx1-ubyte", _garble_deflate),
    "truncated-content": ("t10k-labels-idx1-ubyte", lambda raw: gzip.compress(gzip.decompress(raw)[:-100])),
    "truncated-gzip-stream": ("train-labels-idx1-ubyte", lambda raw: raw[:1000]),
    "altered-byte": ("t10k-images-idx3-ubyte", _flip_byte),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_file_is_rejected_naming_it(data_copy: Path, kind: str):
    name, corrupt = CORRUPTIONS[kind]
    path = data_copy / f"{name}.gz"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError) as exc:
        load_raw(data_copy)
    _assert_one_line_naming(exc, name)


def test_missing_file_is_named(data_copy: Path):
    (data_copy / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        load_raw(data_copy)
    _assert_one_line_naming(exc, "train-labels-idx1-ubyte")


def test_empty_folder_offline_says_how_to_supply(tmp_path: Path, monkeypatch):
    import mnist_bench.data as data

    def offline(root, dataset="mnist"):
        raise data.DataError(f"MNIST files missing in {root} and the download failed (offline); copy the files")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(DataError, match="missing"):
        load_raw(tmp_path)
    with pytest.raises(DataError, match="missing"):
        load_raw(tmp_path, allow_download=False)


def test_download_failure_becomes_one_line(tmp_path: Path, monkeypatch):
    import torchvision.datasets

    import mnist_bench.data as data

    class Unreachable:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirrors")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Unreachable)
    with pytest.raises(DataError) as exc:
        data.download(tmp_path)
    assert "\n" not in str(exc.value) and "--data-dir" in str(exc.value)


# --- Fashion-MNIST: the same format, its own pins ---------------------------------------------------

FASHION = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"


def test_fashion_mnist_loads_verified_with_its_own_pins():
    raw = load_raw(dataset="fashion-mnist")
    assert raw["train-images-idx3-ubyte"].shape == (60000, 28, 28)
    assert torch.bincount(raw["train-labels-idx1-ubyte"].long()).tolist() == [6000] * 10
    assert torch.bincount(raw["t10k-labels-idx1-ubyte"].long()).tolist() == [1000] * 10
    assert abs(raw["train-images-idx3-ubyte"].double().div(255).mean().item() - 0.2860405969887955) < 1e-9
    from mnist_bench.data import PINNED

    for line in (FASHION / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()[:2]
        if not name.endswith(".gz"):
            assert PINNED["fashion-mnist"][name] == digest  # the code's pins are the folder's own
    assert "MIT" in (FASHION / "README.md").read_text()  # the licence notice travels with the copy


@pytest.mark.parametrize("wanted, given", [("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")])
def test_a_file_of_the_other_dataset_is_refused_naming_it(wanted: str, given: str, tmp_path: Path):
    from mnist_bench.paths import default_data_dir

    mixed = tmp_path / "mixed"
    shutil.copytree(default_data_dir(wanted), mixed)
    name = "t10k-labels-idx1-ubyte"
    (mixed / f"{name}.gz").write_bytes((default_data_dir(given) / f"{name}.gz").read_bytes())
    with pytest.raises(DataError) as exc:
        load_raw(mixed, dataset=wanted)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and f"is the {given} file, not {wanted}'s" in msg


def test_torchvision_fashion_layout(tmp_path: Path):
    raw_dir = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in FILES:
        (raw_dir / name).write_bytes(gzip.decompress((FASHION / f"{name}.gz").read_bytes()))
    loaded = load_raw(tmp_path / "tv", dataset="fashion-mnist")
    assert torch.equal(loaded["t10k-labels-idx1-ubyte"], load_raw(dataset="fashion-mnist")["t10k-labels-idx1-ubyte"])
