"""Getting and loading data. `python data.py --config config.yaml [key=value ...]` writes data/<dataset>/
train.npy, test.npy (uint8 NCHW 32x32), their class labels train_labels.npy, test_labels.npy (uint8 (N,)) and
meta.json, atomically: an interrupted run leaves no half dataset.
CIFAR-10 is read from its tar.gz without extracting it, through an unpickler that only builds numpy arrays;
Fashion-MNIST from its IDX files, zero-padded to 32x32. `BatchIterator` serves resumable shuffled batches.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

import config
from ddpm import from_uint8
from runtime import progress_bar

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"  # its name in the download cache (data.root)
CIFAR_MEMBERS = {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
                 "test": ["cifar-10-batches-py/test_batch"]}
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_HINT = "apt-get install dataset-fashion-mnist, or set data.source to a folder holding the four IDX files"
OFFLINE_RECIPE = "python train.py --config configs/fashion-mnist-cpu.yaml"  # what works with no network


class DataError(Exception):
    """A dataset that cannot be fetched, read or written. The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _md5(path: Path) -> str:
    from torchvision.datasets.utils import calculate_md5  # torchvision only when preparing: its import takes ~1 s
    try:
        return calculate_md5(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _check_md5(path: Path, expected: str, label: str, hint: str = "") -> None:
    actual = _md5(path)
    if actual != expected:
        raise DataError(f"{label}: wrong checksum: expected md5 {expected}, got {actual}{hint}")


def _local_path(source: str) -> Path | None:
    """A path or file:// URL -> its Path; None for an http(s) URL."""
    url = urllib.parse.urlparse(source)
    if url.scheme in ("http", "https"):
        return None
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise DataError(f"data.source: {source}: file:// URLs must name a local path")
        return Path(urllib.request.url2pathname(url.path))
    if "://" in source:
        raise DataError(f"data.source: {source}: unsupported URL scheme (use http(s)://, file:// or a path)")
    return Path(source).expanduser()


def _fetch(source: str, cache: Path, md5: str, hint: str = "", offline: str = "") -> Path:
    """A local file with the expected md5: `source` itself (path or file://) or its http(s) download at `cache`.
    `hint` follows a wrong checksum, `offline` a failed download."""
    from torchvision.datasets.utils import check_integrity, download_url
    path = _local_path(source)
    if path is not None:
        _check_md5(path, md5, str(path), hint)
        return path
    if not check_integrity(str(cache), md5):
        part = cache.with_name(f".{cache.name}.part-{os.getpid()}")  # never trusted: renamed only once verified
        try:
            download_url(source, str(part.parent), part.name)
            _check_md5(part, md5, source, hint)
            os.replace(part, cache)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:  # download_url's failures
            raise DataError(f"cannot download {source} ({getattr(e, 'reason', None) or e}); no network? "
                            f"fetch the file elsewhere and set data.source to its path{offline}") from None
        finally:
            part.unlink(missing_ok=True)
    return cache


_PICKLE_GLOBALS = {  # all that CIFAR-10's pickled numpy arrays need; anything else is refused
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # name written by numpy < 2
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _Unpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only, so a crafted archive cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


def _read_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images (n, 3, 32, 32) and labels (n,). Each row of b'data' is R, G, B planes,
    each 32x32 row-major; b'labels' is a list of class indices 0-9."""
    try:
        batch = _Unpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # a malformed pickle can raise almost anything: this is where it becomes a DataError
        raise DataError(f"{name}: cannot unpickle ({type(e).__name__}: {e})") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{name}: expected a dict whose b'data' is uint8 (N, 3072)")
    labels = np.asarray(batch.get(b"labels", []))
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or (len(labels) and not 0 <= labels.min()
                                                                          <= labels.max() <= 9):
        raise DataError(f"{name}: expected b'labels', one class index in 0-9 per image")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _read_cifar(archive: Path, progress: bool) -> dict[str, np.ndarray]:
    """CIFAR-10's python tar.gz -> {"train": (50000, 3, 32, 32), "test": (10000, 3, 32, 32)} uint8 images and
    {"train_labels": (50000,), "test_labels": (10000,)} uint8 class indices."""
    wanted = {m for members in CIFAR_MEMBERS.values() for m in members}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar, progress_bar(
                total=len(wanted), desc=f"reading {archive.name}", unit="batch", disable=not progress) as bar:
            for member in tar:  # one pass over the stream
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise DataError(f"{archive}: unsafe member name {member.name!r}; refusing this archive")
                if member.name in wanted and member.isfile():
                    found[member.name] = _read_batch(tar.extractfile(member).read(), member.name)
                    bar.update()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e})") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{archive}: not a CIFAR-10 python archive (missing {', '.join(missing)})")
    out = {}
    for split, members in CIFAR_MEMBERS.items():
        out[split] = np.concatenate([found[m][0] for m in members])
        out[f"{split}_labels"] = np.concatenate([found[m][1] for m in members])
    return out


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file, gzipped or not -> uint8 array. Magic 2051: images (N, rows, cols); 2049: labels (N,)."""
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    ndim = magic - 2048  # bytes 0 0 8 ndim: uint8 data, then one big-endian uint32 per dimension
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX file with magic number {magic}")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise DataError(f"{path}: truncated or corrupt (header says {shape}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fmnist_folder(cfg: config.Data) -> Path:
    """data.source, else the Debian package's folder, else torchvision's files downloaded under data.root."""
    if cfg.source is not None:
        folder = _local_path(cfg.source)
        if folder is None:
            raise DataError(f"data.source: {cfg.source}: Fashion-MNIST needs a folder, not a URL ({FMNIST_HINT})")
        return folder
    if FMNIST_DIR.is_dir():
        return FMNIST_DIR
    from torchvision.datasets import FashionMNIST
    folder = Path(cfg.root) / "fashion-mnist"
    for name, md5 in FashionMNIST.resources:
        for i, mirror in enumerate(FashionMNIST.mirrors):  # the first that works
            try:
                _fetch(mirror + name, folder / name, md5)
                break
            except DataError as e:
                if i == len(FashionMNIST.mirrors) - 1:
                    raise DataError(f"{e}; or {FMNIST_HINT}") from None
    return folder


def _fmnist_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in `folder`, each plain or .gz, by their official names."""
    files = {name: next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
             for pair in FMNIST_FILES.values() for name in pair}
    missing = [name for name, p in files.items() if p is None]
    if missing:
        raise DataError(f"{folder}: missing Fashion-MNIST files {', '.join(missing)} ({FMNIST_HINT})")
    return files


def _read_fmnist(files: dict[str, Path], progress: bool) -> dict[str, np.ndarray]:
    """-> {"train": (60000, 1, 32, 32), "test": (10000, 1, 32, 32)} uint8: 28x28 images, 2 zero pixels each side;
    and {"train_labels", "test_labels"}: uint8 class indices 0-9."""
    out = {}
    with progress_bar(total=len(FMNIST_FILES), desc="reading fashion-mnist", unit="split",
                      disable=not progress) as bar:
        for split, (images, labels) in FMNIST_FILES.items():
            x = _read_idx(files[images], 2051)
            y = _read_idx(files[labels], 2049)
            if x.shape[1:] != (28, 28) or len(y) != len(x) or (len(y) and y.max() > 9):
                raise DataError(f"{files[images]}: expected 28x28 images, one label in 0-9 per image; got {x.shape}, "
                                f"{len(y)} labels")
            out[split] = np.pad(x[:, None], ((0, 0), (0, 0), (2, 2), (2, 2)))
            out[f"{split}_labels"] = y
            bar.update()
    return out


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) in [0, 1] units; exact, from a histogram (no float copy)."""
    levels = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        p = np.bincount(x[:, c].ravel(), minlength=256) / x[:, c].size
        mean = float(p @ levels)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (levels - mean) ** 2)))
    return means, stds


def _is_current(target: Path, source_md5: dict[str, str]) -> bool:
    """Whether `target` holds a finished dataset made from exactly these source files."""
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("source_md5") == source_md5
            and all((target / f"{name}.npy").is_file() for name in ("train", "test", "train_labels", "test_labels")))


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (Linux: any open descriptor will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(target: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Fill a temp folder next to `target`, fsync it, then swap it in for any old one."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for split, x in arrays.items():
            np.save(tmp / f"{split}.npy", x)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for p in [*tmp.iterdir(), tmp]:
            _fsync(p)
        if target.exists():
            os.rename(target, old)  # a folder cannot replace a non-empty one in a single rename
        os.rename(tmp, target)
        _fsync(target.parent)
    except OSError as e:
        raise DataError(f"cannot write {target}: {e}") from None
    finally:  # also on Ctrl-C: put the old dataset back if the swap did not finish
        if old.exists() and not target.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def prepare(cfg: config.Data, out_root: str | Path = "data", progress: bool = True) -> Path:
    """Write `out_root/<dataset>/` {train,test}.npy and meta.json from cfg's source; a no-op when up to date."""
    target = Path(out_root) / cfg.dataset
    if cfg.dataset == "cifar10":
        md5 = (cfg.md5 or CIFAR_MD5).lower()
        source, source_md5 = cfg.source or CIFAR_URL, {CIFAR_ARCHIVE: md5}
        if _is_current(target, source_md5):
            return target
        hint = " (set data.md5 if it is another archive on purpose)"
        offline = f"; or train offline on Fashion-MNIST: {OFFLINE_RECIPE}"
        arrays = _read_cifar(_fetch(source, Path(cfg.root) / CIFAR_ARCHIVE, md5, hint, offline), progress)
    elif cfg.dataset == "fashion-mnist":
        folder = _fmnist_folder(cfg)
        files = _fmnist_files(folder)
        source, source_md5 = str(folder), {p.name: _md5(p) for p in files.values()}
        if _is_current(target, source_md5):
            return target
        arrays = _read_fmnist(files, progress)
    else:
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    mean, std = _channel_stats(arrays["train"])
    meta = {"dataset": cfg.dataset, "layout": "uint8 NCHW", "source": source, "source_md5": source_md5,
            "train_shape": list(arrays["train"].shape), "test_shape": list(arrays["test"].shape),
            "labels": "train_labels.npy, test_labels.npy: uint8 class index per image, 0-9",
            "train_mean_01": mean, "train_std_01": std, "stats": "per channel over train, pixels scaled to [0, 1]"}
    _write(target, arrays, meta)
    return target


def ensure_prepared(cfg: config.Data, out_root: str | Path = "data") -> Path:
    """The dataset folder, prepared first unless its meta.json (written last) is already there."""
    path = Path(out_root) / cfg.dataset
    return path if (path / "meta.json").is_file() else prepare(cfg, out_root)


def dataset_id(folder: str | Path) -> str:
    """A prepared dataset's identity: the sha256 of its meta.json, which names the source files by checksum and
    records the shapes and pixel statistics. A checkpoint records it, so that a resume on other data is refused."""
    path = Path(folder) / "meta.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def load_dataset(path: str | Path, subset: int | None = None, crop: int = 0) -> Tensor:
    """uint8 (N, C, H, W) from a dataset folder (its train.npy) or a .npy file; `subset`: the first N images;
    `crop`: pixels cut from each side (data.crop), so (N, C, H - 2 crop, W - 2 crop)."""
    p = Path(path)
    p = p / "train.npy" if p.is_dir() else p
    try:
        x = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot load ({type(e).__name__}: {e})") from None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and len(x) > 0):
        raise DataError(f"{p}: expected a non-empty uint8 (N, C, H, W) array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if subset is not None and not 1 <= subset <= len(x):
        raise DataError(f"{p}: subset {subset} is not in [1, {len(x)}]")
    if not 0 <= 2 * crop < min(x.shape[2:]):
        raise DataError(f"{p}: cannot crop {crop} pixels from each side of {x.shape[2]}x{x.shape[3]} images")
    h, w = x.shape[2:]
    return torch.from_numpy(np.array(x[:subset, :, crop:h - crop, crop:w - crop]))  # a copy: the map stays read-only


def load_labels(path: str | Path) -> Tensor:
    """uint8 class indices (N,) of a dataset file: data/<dataset>/train.npy -> train_labels.npy beside it."""
    p = Path(path)
    p = p / "train.npy" if p.is_dir() else p
    q = p.with_name(f"{p.stem}_labels.npy")
    try:
        y = np.load(q, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{q}: cannot load labels ({type(e).__name__}); prepare the data again: "
                        f"python data.py --config config.yaml") from None
    if not (y.dtype == np.uint8 and y.ndim == 1):
        raise DataError(f"{q}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
    return torch.from_numpy(y)


class BatchIterator:
    """Shuffled batches, float32 in [-1, 1], from one uint8 (N, C, H, W) tensor that stays on `device`.

    An epoch shows every image once (the last batch may be partial). All randomness comes from one CPU
    generator; its state at the start of the epoch plus (epoch, index) is the whole resumable state.
    """

    def __init__(self, images: Tensor, batch_size: int, *, seed: int, device: torch.device | str = "cpu",
                 random_flip: bool = True):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) > 0, (images.dtype, images.shape)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # moved once; batches are gathered on the device
        self.batch_size, self.random_flip = batch_size, random_flip
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.index = 0, 0
        self._draw()

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def _draw(self) -> None:
        """Remember the generator's state, then draw this epoch's permutation and flip mask from it."""
        self._epoch_state = self.generator.get_state()
        n = len(self.images)
        self._perm = torch.randperm(n, generator=self.generator).to(self.device)
        self._flip = (torch.rand(n, generator=self.generator) < 0.5).to(self.device)

    def epoch_batches(self) -> Iterator[Tensor]:
        """Yield the current epoch's remaining batches (B, C, H, W), then move on to the next epoch."""
        while self.index < len(self):
            rows = slice(self.index * self.batch_size, (self.index + 1) * self.batch_size)
            x = self.images.index_select(0, self._perm[rows])  # (B, C, H, W) uint8
            if self.random_flip:
                x = torch.where(self._flip[rows, None, None, None], x.flip(3), x)
            self.index += 1  # before the yield: a state_dict taken while the caller holds batch k says k + 1 done
            yield from_uint8(x)
        self.epoch, self.index = self.epoch + 1, 0
        self._draw()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "generator_state": self._epoch_state.clone(),
                "num_images": len(self.images), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the iterator that made `state` was."""
        if (state["num_images"], state["batch_size"]) != (len(self.images), self.batch_size):
            raise ValueError(f"iterator state is for {state['num_images']} images in batches of "
                             f"{state['batch_size']}, not {len(self.images)} in batches of {self.batch_size}")
        if not 0 <= state["index"] <= len(self):
            raise ValueError(f"iterator state index {state['index']} is not in [0, {len(self)}]")
        self.generator.set_state(state["generator_state"])
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._draw()


def main(argv: list[str] | None = None) -> None:
    cfg, _ = config.cli("Prepare the config's dataset as data/<dataset>/{train,test}.npy and meta.json.", argv)
    try:
        path = prepare(cfg.data)
    except DataError as e:
        config.fail(str(e))
    meta = json.loads((path / "meta.json").read_text())
    print(f"{path}: train {tuple(meta['train_shape'])}, test {tuple(meta['test_shape'])}")


if __name__ == "__main__":
    main()
