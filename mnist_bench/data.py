"""Pinned MNIST and Fashion-MNIST: verified IDX files -> one normalised float32 tensor per split.

The repository keeps its own copy of the four official files of each dataset (``data/mnist``,
``data/fashion-mnist``, gzip). Both use the same file names and shapes; every load checks the
SHA-256 of the *decompressed* bytes against the pinned values below, so a truncated, altered,
missing or other-dataset file stops the program with one line before any training starts.

Batches are drawn by indexing a per-epoch permutation of the on-device tensor (airbench style):
no per-sample PIL/``ToTensor`` work and no DataLoader in the hot path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError, UserError
from .paths import DATASETS, default_data_dir

# SHA-256 of the decompressed official files (same values as data/<dataset>/SHA256SUMS).
PINNED = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
SHA256 = PINNED["mnist"]
FILES = tuple(SHA256)
RAW_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # torchvision's DIR/<name>/raw layout
assert set(PINNED) == set(DATASETS) == set(RAW_FOLDERS)
VAL_SIZE = 10_000  # default hold-out carved from the 60k training images


class DataError(UserError):
    """Missing, truncated or altered data. The message is one line, meant for the user."""


class DeviceError(UsageError):
    """A device that cannot be used here (a usage error). The message is one line."""


@dataclass(frozen=True)
class MNIST:
    """The whole dataset on one device. Images are float32 in [0, 1], shape (n, 784)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def standardised(self) -> MNIST:
        """Every split shifted and scaled by the training images' pixel mean and standard deviation
        (one scalar each, as torchvision's Normalize((0.1307,), (0.3081,)) does for MNIST)."""
        mean, std = self.train_x.mean(), self.train_x.std()
        return MNIST(
            (self.train_x - mean) / std,
            self.train_y,
            (self.val_x - mean) / std,
            self.val_y,
            (self.test_x - mean) / std,
            self.test_y,
        )


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; cpu, cuda and cuda:N are accepted only where they exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' requested but CUDA is not available here (use --device cpu)")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{device}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device(device)
    raise DeviceError(f"unknown device '{device}' (use auto, cpu or cuda)")


def find_file(data_dir: Path, name: str, dataset: str = "mnist") -> Path | None:
    """The file `name` (raw or .gz) in `data_dir` or torchvision's `data_dir/<MNIST|FashionMNIST>/raw`."""
    for folder in (data_dir, data_dir / RAW_FOLDERS[dataset] / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_verified(path: Path, name: str, dataset: str = "mnist") -> bytes:
    """Decompressed bytes of `path`, after checking them against the pinned SHA-256 of `dataset`."""
    expected = PINNED[dataset][name]
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({e}); expected decompressed sha256 {expected}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        other = next((d for d, pins in PINNED.items() if pins[name] == digest), None)
        if other is not None:
            raise DataError(
                f"{path} is the {other} file, not {dataset}'s (sha256 {digest}); pass --dataset "
                f"{other} or point --data-dir at the {dataset} files"
            )
        raise DataError(f"{path}: sha256 {digest} does not match the pinned {expected}")
    return raw


def parse_idx(raw: bytes) -> torch.Tensor:
    """IDX (LeCun's format): magic 0x0000 08 <ndim>, big-endian int32 dims, then uint8 data."""
    if raw[:3] != b"\x00\x00\x08":
        raise DataError("not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(dims)


def download(data_dir: Path, dataset: str = "mnist") -> None:
    """Fetch the four files through torchvision's mirrors into `data_dir/<MNIST|FashionMNIST>/raw`."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, RAW_FOLDERS[dataset])
    created = [
        p
        for p in (data_dir, data_dir / RAW_FOLDERS[dataset], data_dir / RAW_FOLDERS[dataset] / "raw")
        if not p.exists()
    ]  # what a failed download must not leave behind
    try:
        cls(root=str(data_dir), train=True, download=True)
        cls(root=str(data_dir), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure becomes one line
        for folder in reversed(created):  # innermost first; only folders this call made, and only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{dataset} files missing in {data_dir} and the download failed ({first}); copy the four "
            f"files ({', '.join(FILES)}, .gz or raw) into that folder or pass --data-dir"
        ) from None


def load_raw(
    data_dir: str | Path | None = None, allow_download: bool = True, dataset: str = "mnist"
) -> dict[str, torch.Tensor]:
    """The four verified uint8 tensors, keyed by file name. Every file is checked before any is parsed."""
    if dataset not in PINNED:
        raise UsageError(f"unknown dataset {dataset!r} (use {' or '.join(PINNED)})")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    paths = {name: find_file(data_dir, name, dataset) for name in FILES}
    if all(p is None for p in paths.values()) and allow_download:
        download(data_dir, dataset)
        paths = {name: find_file(data_dir, name, dataset) for name in FILES}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"{data_dir / missing[0]}(.gz) is missing; expected decompressed sha256 {PINNED[dataset][missing[0]]}"
        )
    raws = {name: read_verified(path, name, dataset) for name, path in paths.items()}
    return {name: parse_idx(raw) for name, raw in raws.items()}


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a seeded permutation of range(n), the first `val_size` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:], order[:val_size]


@dataclass(frozen=True)
class Source:
    """The verified dataset as loaded, before any split: the 60k training images as uint8 and the test split
    already on `device` as float32. `split` makes a train / validation split of it; every split shares one
    test tensor, so a study can give each seed its own hold-out without a copy of the test set per seed."""

    images: torch.Tensor  # uint8 (60000, 28, 28)
    labels: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.test_x.device

    def split(self, val_size: int = VAL_SIZE, split_seed: int = 0, train_subset: int | None = None) -> MNIST:
        """Train / validation / test: a seeded hold-out of `val_size` training images (split_indices), and
        the first `train_subset` of the remaining images when given; validation and test are never cut."""
        if not 0 <= val_size < len(self.images):
            raise DataError(f"validation size {val_size} must be in [0, {len(self.images) - 1}]")
        train_idx, val_idx = split_indices(len(self.images), val_size, split_seed)
        if train_subset is not None:
            if not 0 < train_subset <= len(train_idx):
                raise UsageError(
                    f"training subset {train_subset} must be in 1..{len(train_idx)} (the training "
                    f"images left after a {val_size}-image hold-out)"
                )
            train_idx = train_idx[:train_subset]
        return MNIST(
            train_x=_images_to(self.images[train_idx], self.device),
            train_y=_labels_to(self.labels[train_idx], self.device),
            val_x=_images_to(self.images[val_idx], self.device),
            val_y=_labels_to(self.labels[val_idx], self.device),
            test_x=self.test_x,
            test_y=self.test_y,
        )


def _images_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 784) in [0, 1] on `device`, once."""
    return (x.reshape(len(x), 28 * 28).to(device=device, dtype=torch.float32) / 255.0).contiguous()


def _labels_to(y: torch.Tensor, device: torch.device) -> torch.Tensor:
    return y.to(device=device, dtype=torch.long)


def load_source(
    data_dir: str | Path | None = None, device: str | torch.device = "cpu", dataset: str = "mnist"
) -> Source:
    """The verified dataset on `device`, not yet split (see Source.split)."""
    raw = load_raw(data_dir, dataset=dataset)
    device = resolve_device(device) if isinstance(device, str) else device
    return Source(
        images=raw["train-images-idx3-ubyte"],
        labels=raw["train-labels-idx1-ubyte"],
        test_x=_images_to(raw["t10k-images-idx3-ubyte"], device),
        test_y=_labels_to(raw["t10k-labels-idx1-ubyte"], device),
    )


def load_mnist(
    data_dir: str | Path | None = None,
    val_size: int = VAL_SIZE,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    train_subset: int | None = None,
    dataset: str = "mnist",
) -> MNIST:
    """Verified MNIST on `device`, split into train / validation / test.

    The validation set is a fixed, seeded hold-out of `val_size` images from the 60k training
    images (0 trains on all 60k). `train_subset` keeps only the first n of the remaining training
    images (for quick runs and tests); validation and test are never cut.
    """
    return load_source(data_dir, device, dataset).split(val_size, split_seed, train_subset)
