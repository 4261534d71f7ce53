"""data.py: CIFAR-10 archives built here (known pixels) and the real Fashion-MNIST go through the same code as
a real run; the stage is checked, atomic and idempotent; the batch iterator covers each epoch once, flips
about half the images horizontally, and resumes exactly from a saved state."""
import functools
import gzip
import http.server
import os
import pickle
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import config
import data
from data import BatchIterator, DataError
from ddpm import to_uint8
from helpers import ROOT, RunsCode, make_cifar_archive, md5_of, one_error_line, run_cli, write_config


# ---------------------------------------------------------------- helpers

def planes(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) -> (N, 3, 32, 32), spelled out: 1024 red values, then green, then blue, each 32 rows of 32."""
    return np.stack([rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], axis=1)


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[Path, str, np.ndarray, np.ndarray]:
    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = make_cifar_archive(archive)
    return archive, md5_of(archive), train, test


def cifar_cfg(source: str, md5: str | None, tmp_path: Path) -> config.Data:
    return config.Data(source=source, md5=md5, root=str(tmp_path / "raw"))


def failing_main(tmp_path: Path, monkeypatch, capsys, *overrides: str, cfg: str | None = None) -> str:
    """Run `python data.py` in-process from tmp_path, with its progress bars on; assert exit 2 and one `error:`
    line left on the terminal (no traceback, no progress bar); return that line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        data.main(["--config", cfg or os.devnull, *overrides])
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_cifar_archive_decodes_to_nchw(cifar, tmp_path: Path, as_url: bool) -> None:
    archive, md5, train_rows, test_rows = cifar
    source = archive.as_uri() if as_url else str(archive)
    out = data.prepare(cifar_cfg(source, md5, tmp_path), tmp_path / "data", progress=False)
    assert out == tmp_path / "data" / "cifar10"
    train, test = np.load(out / "train.npy"), np.load(out / "test.npy")
    assert train.dtype == test.dtype == np.uint8
    assert train.shape == (30, 3, 32, 32) and test.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(train, planes(train_rows))
    np.testing.assert_array_equal(test, planes(test_rows))
    for split, rows in (("train", train_rows), ("test", test_rows)):  # one class label per image, in order
        labels = np.load(out / f"{split}_labels.npy")
        assert labels.dtype == np.uint8 and np.array_equal(labels, rows[:, 0] % 10)
        assert torch.equal(data.load_labels(out / f"{split}.npy"), torch.from_numpy(labels))
    # One pixel by hand, at row 3, column 29 of image 7: its R, G, B values lie 1024 apart in the flat row.
    rgb = [int(train_rows[7, c * 1024 + 3 * 32 + 29]) for c in range(3)]
    assert len(set(rgb)) == 3 and train[7, :, 3, 29].tolist() == rgb
    meta = yaml.safe_load((out / "meta.json").read_text())  # JSON is YAML
    assert meta["dataset"] == "cifar10" and meta["source_md5"] == {"cifar-10-python.tar.gz": md5}
    assert meta["train_shape"] == [30, 3, 32, 32] and meta["test_shape"] == [10, 3, 32, 32]
    unit = train / 255.0
    np.testing.assert_allclose(meta["train_mean_01"], unit.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(meta["train_std_01"], unit.std(axis=(0, 2, 3)), rtol=1e-9)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar10"]  # no temp folder left
    assert not (tmp_path / "raw").exists()  # a local archive is read in place, not copied to the cache


def test_second_run_is_a_noop_and_a_new_archive_replaces_the_old(cifar, tmp_path: Path) -> None:
    archive, md5, _, _ = cifar
    out = data.prepare(cifar_cfg(str(archive), md5, tmp_path), tmp_path / "data", progress=False)
    before = (out / "train.npy").stat()
    assert data.prepare(cifar_cfg(str(archive), md5, tmp_path), tmp_path / "data", progress=False) == out
    after = (out / "train.npy").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    other = tmp_path / "other.tar.gz"
    train_rows, _ = make_cifar_archive(other, seed=1, n=2)
    data.prepare(cifar_cfg(str(other), md5_of(other), tmp_path), tmp_path / "data", progress=False)
    np.testing.assert_array_equal(np.load(out / "train.npy"), planes(train_rows))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar10"]


@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_interrupted_run_keeps_the_old_dataset(cifar, tmp_path: Path, monkeypatch, when: str) -> None:
    """Ctrl-C while test.npy is written, or between moving the old folder aside and renaming the new one in."""
    archive, md5, train_rows, _ = cifar
    out = data.prepare(cifar_cfg(str(archive), md5, tmp_path), tmp_path / "data", progress=False)
    meta = (out / "meta.json").read_text()
    other = tmp_path / "other.tar.gz"
    make_cifar_archive(other, seed=1)
    name, real = ("save", np.save) if when == "writing" else ("rename", os.rename)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(np if when == "writing" else os, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cifar_cfg(str(other), md5_of(other), tmp_path), tmp_path / "data", progress=False)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar10"]
    assert (out / "meta.json").read_text() == meta
    np.testing.assert_array_equal(np.load(out / "train.npy"), planes(train_rows))


def test_wrong_md5_exits_2_and_writes_nothing(cifar, tmp_path: Path) -> None:
    """The real CLI, as a subprocess: exit status 2, one line naming the file and both md5s, no traceback."""
    archive, md5, _, _ = cifar
    cfg = write_config({"data": {"source": str(archive), "md5": "0" * 32}}, tmp_path / "c.yaml")
    run = run_cli("data.py", "--config", str(cfg), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line = one_error_line(run.stderr)
    assert str(archive) in line and "0" * 32 in line and md5 in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"not a tar.gz\n" * 100],
                         ids=["truncated", "garbage"])
def test_corrupt_archive_exits_2_and_writes_nothing(cifar, tmp_path: Path, monkeypatch, capsys, damage) -> None:
    archive, _, _, _ = cifar
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(damage(archive.read_bytes()))
    # (`data.md5=...` is no valid override: config.py's key regex)
    cfg = write_config({"data": {"md5": md5_of(bad)}}, tmp_path / "c.yaml")
    err = failing_main(tmp_path, monkeypatch, capsys, f"data.source={bad}", cfg=cfg)
    assert "truncated or corrupt archive" in err and str(bad) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "c.yaml", "cifar-10-python.tar.gz"]


def test_unreachable_url_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    url = "http://127.0.0.1:9/x.tar.gz"  # the discard port: closed, so this fails at once and offline
    err = failing_main(tmp_path, monkeypatch, capsys, f"data.source={url}", "data.root=raw")
    assert f"cannot download {url}" in err and "no network?" in err
    assert err.endswith("or train offline on Fashion-MNIST: python train.py --config configs/fashion-mnist-cpu.yaml")
    assert (ROOT / "configs" / "fashion-mnist-cpu.yaml").is_file()  # the command it gives exists
    assert files_under(tmp_path) == [] and not (tmp_path / "data").exists()  # no partial download left


@pytest.fixture
def http_folder(tmp_path: Path):
    """A folder served over http on 127.0.0.1 (no network needed); yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_http_download_is_verified_before_it_is_kept(http_folder, tmp_path: Path) -> None:
    folder, base = http_folder
    train_rows, _ = make_cifar_archive(folder / "c.tar.gz")
    md5 = md5_of(folder / "c.tar.gz")
    with pytest.raises(DataError, match=f"{base}/c.tar.gz: wrong checksum: expected md5 {'0' * 32}, got {md5}"):
        data.prepare(config.Data(source=f"{base}/c.tar.gz", md5="0" * 32, root=str(tmp_path / "raw")),
                     tmp_path / "data", progress=False)
    assert files_under(tmp_path / "raw") == [] and not (tmp_path / "data").exists()  # the download is gone

    cfg = config.Data(source=f"{base}/c.tar.gz", md5=md5, root=str(tmp_path / "raw"))
    out = data.prepare(cfg, tmp_path / "data", progress=False)
    np.testing.assert_array_equal(np.load(out / "train.npy"), planes(train_rows))
    assert files_under(tmp_path / "raw") == [tmp_path / "raw" / "cifar-10-python.tar.gz"]
    (folder / "c.tar.gz").unlink()  # the cached, verified copy is enough from now on
    shutil.rmtree(out)
    assert data.prepare(cfg, tmp_path / "data", progress=False) == out and (out / "train.npy").is_file()


@pytest.mark.parametrize("dataset, source, message", [
    ("cifar10", "ftp://example.org/c.tar.gz", "unsupported URL scheme"),
    ("cifar10", "file://otherhost/c.tar.gz", "must name a local path"),
    ("cifar10", "/no/such/c.tar.gz", "cannot read /no/such/c.tar.gz"),
    ("fashion-mnist", "https://example.org/fmnist/", "needs a folder, not a URL"),
])
def test_unusable_sources_are_named(tmp_path: Path, dataset: str, source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        data.prepare(config.Data(dataset=dataset, source=source, root=str(tmp_path / "raw")), tmp_path / "data")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "cifar-10-batches-py/../../evil"])
def test_archive_with_unsafe_member_is_rejected(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "a.tar.gz"
    make_cifar_archive(archive, extra=((name, b"boom"),))
    with pytest.raises(DataError, match="unsafe member name"):
        data.prepare(cifar_cfg(str(archive), md5_of(archive), tmp_path), tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_pickles_cannot_run_code(tmp_path: Path) -> None:
    marker, archive = tmp_path / "pwned", tmp_path / "a.tar.gz"
    make_cifar_archive(archive, extra=(("cifar-10-batches-py/data_batch_1", pickle.dumps(RunsCode(marker))),))
    with pytest.raises(DataError, match="refusing to unpickle"):
        data.prepare(cifar_cfg(str(archive), md5_of(archive), tmp_path), tmp_path / "data", progress=False)
    assert not marker.exists() and not (tmp_path / "data").exists()


def test_archive_missing_a_batch_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    make_cifar_archive(archive, omit="test_batch")
    with pytest.raises(DataError, match="missing cifar-10-batches-py/test_batch"):
        data.prepare(cifar_cfg(str(archive), md5_of(archive), tmp_path), tmp_path / "data", progress=False)


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, x: np.ndarray, magic: int) -> None:
    blob = struct.pack(f">I{x.ndim}I", magic, *x.shape) + x.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def tiny_fmnist(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    """The four IDX files with 5 train and 3 test random 28x28 images; returns the images by file prefix."""
    folder.mkdir(exist_ok=True)
    rng, out, ext = np.random.default_rng(0), {}, ".gz" if gz else ""
    for split, n in {"train": 5, "t10k": 3}.items():
        out[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", out[split], 2051)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n), 2049)
    return out


def assert_padded(x: np.ndarray, images: np.ndarray) -> None:
    """x (N, 1, 32, 32) holds the 28x28 `images` with a zero border of 2 pixels on each side."""
    assert x.dtype == np.uint8 and x.shape == (len(images), 1, 32, 32)
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30], images)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not x[:, 0, border].any()


@pytest.fixture(scope="session")
def fmnist_real(tmp_path_factory) -> Path:
    """The full Fashion-MNIST from the Debian package, prepared once per session (the default source)."""
    if not data.FMNIST_DIR.is_dir():
        pytest.skip(f"{data.FMNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    return data.prepare(config.Data(dataset="fashion-mnist"), tmp_path_factory.mktemp("out"), progress=False)


def test_fashion_mnist_from_the_debian_package(fmnist_real: Path) -> None:
    for split, prefix, n in [("train", "train", 60000), ("test", "t10k", 10000)]:
        source = data.FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        images = np.frombuffer(gzip.decompress(source.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
        assert len(images) == n
        assert_padded(np.load(fmnist_real / f"{split}.npy", mmap_mode="r"), images)
        labels = np.frombuffer(gzip.decompress((data.FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()),
                               np.uint8, offset=8)
        assert np.array_equal(np.load(fmnist_real / f"{split}_labels.npy"), labels) and np.bincount(labels).tolist() \
            == [n // 10] * 10  # Fashion-MNIST is balanced
    meta = yaml.safe_load((fmnist_real / "meta.json").read_text())
    assert meta["train_shape"] == [60000, 1, 32, 32] and meta["test_shape"] == [10000, 1, 32, 32]
    assert meta["source_md5"] == {p.name: md5_of(p) for p in data.FMNIST_DIR.glob("*-ubyte.gz")}
    assert abs(meta["train_mean_01"][0] - 0.2860 * 28 * 28 / (32 * 32)) < 1e-3  # the known 28x28 mean, diluted


def test_fashion_mnist_second_run_is_a_noop(fmnist_real: Path) -> None:
    before = (fmnist_real / "train.npy").stat()
    data.prepare(config.Data(dataset="fashion-mnist"), fmnist_real.parent, progress=False)
    after = (fmnist_real / "train.npy").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_fashion_mnist_idx_files_via_the_cli(tmp_path: Path, monkeypatch, capsys, gz: bool) -> None:
    images = tiny_fmnist(tmp_path / "src", gz)
    monkeypatch.chdir(tmp_path)
    data.main(["--config", os.devnull, "data.dataset=fashion-mnist", f"data.source={tmp_path / 'src'}"])
    assert "(5, 1, 32, 32)" in capsys.readouterr().out
    assert_padded(np.load(tmp_path / "data/fashion-mnist/train.npy"), images["train"])
    assert_padded(np.load(tmp_path / "data/fashion-mnist/test.npy"), images["t10k"])


def test_fashion_mnist_without_the_package_downloads_torchvisions_files(http_folder, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """No Debian folder: the files and md5s of torchvision's FashionMNIST, here served from 127.0.0.1."""
    from torchvision.datasets import FashionMNIST
    folder, base = http_folder
    images = tiny_fmnist(folder, gz=True)
    monkeypatch.setattr(data, "FMNIST_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/", f"{base}/"])  # the first one is down
    monkeypatch.setattr(FashionMNIST, "resources", [(p.name, md5_of(p)) for p in sorted(folder.iterdir())])
    out = data.prepare(config.Data(dataset="fashion-mnist", root=str(tmp_path / "raw")), tmp_path / "data",
                       progress=False)
    assert_padded(np.load(out / "train.npy"), images["train"])
    cached = sorted(tmp_path / "raw" / "fashion-mnist" / p.name for p in folder.iterdir())
    assert files_under(tmp_path / "raw") == cached

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match="cannot download .*apt-get install dataset-fashion-mnist"):
        data.prepare(config.Data(dataset="fashion-mnist", root=str(tmp_path / "raw2")), tmp_path / "d2",
                     progress=False)


def test_fashion_mnist_missing_files_says_how_to_get_them(tmp_path: Path, monkeypatch, capsys) -> None:
    tiny_fmnist(tmp_path / "src", gz=True)
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    err = failing_main(tmp_path, monkeypatch, capsys, "data.dataset=fashion-mnist", f"data.source={tmp_path / 'src'}")
    assert "t10k-labels-idx1-ubyte" in err and "apt-get install dataset-fashion-mnist" in err
    assert "data.source" in err and not (tmp_path / "data").exists()


def test_fashion_mnist_truncated_idx_file_exits_2_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """The progress bar that was reading the files is erased, not left above the error line."""
    tiny_fmnist(tmp_path / "src", gz=False)
    images = tmp_path / "src" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    err = failing_main(tmp_path, monkeypatch, capsys, "data.dataset=fashion-mnist", f"data.source={tmp_path / 'src'}")
    assert f"{images}: truncated or corrupt" in err
    assert not (tmp_path / "data").exists()


def test_fashion_mnist_bad_idx_header_is_rejected(tmp_path: Path) -> None:
    tiny_fmnist(tmp_path / "src", gz=False)
    write_idx(tmp_path / "src" / "train-images-idx3-ubyte", np.zeros((5, 28, 28)), 2049)
    with pytest.raises(DataError, match="magic number 2051"):
        data.prepare(config.Data(dataset="fashion-mnist", source=str(tmp_path / "src")), tmp_path, progress=False)


# ---------------------------------------------------------------- loading

def test_load_dataset(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (7, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "train.npy", x)
    loaded = data.load_dataset(tmp_path)
    assert loaded.dtype == torch.uint8 and torch.equal(loaded, torch.from_numpy(x))
    assert torch.equal(data.load_dataset(tmp_path / "train.npy", subset=3), torch.from_numpy(x[:3]))
    with pytest.raises(DataError, match="subset 8"):
        data.load_dataset(tmp_path, subset=8)


def test_load_dataset_crops_each_side(tmp_path: Path) -> None:
    """data.crop: 2 pixels cut from each side of Fashion-MNIST's padded 32x32 give back its 28x28 images."""
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 6), dtype=np.uint8)
    np.save(tmp_path / "train.npy", x)
    assert torch.equal(data.load_dataset(tmp_path, crop=1), torch.from_numpy(x[:, :, 1:7, 1:5]))
    assert torch.equal(data.load_dataset(tmp_path, 2, crop=2), torch.from_numpy(x[:2, :, 2:6, 2:4]))
    assert torch.equal(data.load_dataset(tmp_path, crop=0), torch.from_numpy(x))
    with pytest.raises(DataError, match="cannot crop 3 pixels from each side of 8x6 images"):
        data.load_dataset(tmp_path, crop=3)


@pytest.mark.parametrize("content", [np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8),
                                     np.array([{}], dtype=object), b"not a npy file", None],
                         ids=["float32", "3d", "pickled", "garbage", "missing"])
def test_load_dataset_rejects_bad_files(tmp_path: Path, content) -> None:
    path = tmp_path / "x.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(DataError, match=str(path)):
        data.load_dataset(path)


def test_ensure_prepared_prepares_only_when_meta_json_is_missing(tmp_path: Path) -> None:
    cfg = cifar_cfg(str(tmp_path / "no-such-archive.tar.gz"), None, tmp_path)
    with pytest.raises(DataError, match="no-such-archive"):
        data.ensure_prepared(cfg, tmp_path)
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "meta.json").write_text("{}")
    assert data.ensure_prepared(cfg, tmp_path) == tmp_path / "cifar10"


# ---------------------------------------------------------------- BatchIterator

def run_epochs(it: BatchIterator, epochs: int) -> list[torch.Tensor]:
    out = []
    while it.epoch < epochs:
        out.extend(x.cpu() for x in it.epoch_batches())
    return out


def indexed_images(n: int) -> torch.Tensor:
    """Image i is the constant i: flips leave it alone, and its index can be read back from any pixel."""
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 2, 3, 5).contiguous()


def test_every_image_once_per_epoch(device: torch.device) -> None:
    it = BatchIterator(indexed_images(50), 8, seed=0, device=device)
    assert len(it) == 7 and it.images.device.type == device.type
    orders = []
    for epoch in range(2):
        batches = list(it.epoch_batches())
        assert [len(x) for x in batches] == [8] * 6 + [2] and it.epoch == epoch + 1 and it.index == 0
        for x in batches:
            assert x.dtype == torch.float32 and x.device.type == device.type and x.shape[1:] == (2, 3, 5)
            assert x.min() >= -1 and x.max() <= 1
        order = to_uint8(torch.cat(batches))[:, 0, 0, 0].cpu()
        assert sorted(order.tolist()) == list(range(50))
        orders.append(order)
    assert not torch.equal(*orders)  # reshuffled each epoch


@pytest.mark.parametrize("random_flip", [True, False])
def test_flips_about_half_horizontally(device: torch.device, random_flip: bool) -> None:
    n = 2000
    pattern = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 4, 5), dtype=np.uint8))
    assert not (pattern == pattern.flip(-1)).all(-1).all(-1).any()  # no image is its own mirror
    ids = torch.arange(n)
    images = torch.stack([(ids % 256)[:, None, None].expand(n, 4, 5), (ids // 256)[:, None, None].expand(n, 4, 5),
                          pattern], 1).to(torch.uint8)  # (n, 3, 4, 5): channels 0 and 1 spell the index
    it = BatchIterator(images, 128, seed=0, device=device, random_flip=random_flip)
    out = to_uint8(torch.cat(list(it.epoch_batches()))).cpu()
    original = images[out[:, 0, 0, 0].long() + 256 * out[:, 1, 0, 0].long()]
    same = (out == original).flatten(1).all(1)
    mirrored = (out == original.flip(3)).flatten(1).all(1)  # flipped along W, and nothing else
    assert (same ^ mirrored).all()
    flipped = int(mirrored.sum())
    if random_flip:
        assert abs(flipped - n / 2) < 6 * (n / 4) ** 0.5, flipped  # Binomial(2000, 1/2): 6 standard deviations
    else:
        assert flipped == 0


def test_same_seed_same_batches(device: torch.device) -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 3, 4, 4), dtype=np.uint8))
    a, b, c = (run_epochs(BatchIterator(images, 16, seed=s, device=device), 2) for s in (7, 7, 8))
    assert len(a) == len(b) == len(c) == 6
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop, finish_epoch", [(0, False), (3, False), (7, False), (7, True), (10, False),
                                                 (20, False)])
def test_resume_from_state_dict_is_exact(device: torch.device, tmp_path: Path, stop: int, finish_epoch: bool) -> None:
    """Stop after `stop` batches (7 per epoch; (7, False) is after receiving the epoch's last batch, (7, True)
    after the epoch ended), save the state through torch.save/torch.load, and go on in a fresh iterator."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 3, 4, 4), dtype=np.uint8))
    reference = run_epochs(BatchIterator(images, 8, seed=3, device=device), 3)
    first, got = BatchIterator(images, 8, seed=3, device=device), []
    while len(got) < stop:
        for x in first.epoch_batches():
            got.append(x.cpu())
            if len(got) == stop and not finish_epoch:
                break
    state = first.state_dict()
    held_last = stop > 0 and stop % 7 == 0 and not finish_epoch  # the epoch's end is not reached yet
    assert (state["epoch"], state["index"]) == ((stop // 7 - 1, 7) if held_last else divmod(stop, 7))
    torch.save(state, tmp_path / "state.pt")
    resumed = BatchIterator(images, 8, seed=12345, device=device)  # the seed is overridden by the state
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got += run_epochs(resumed, 3)
    assert len(got) == len(reference) == 21
    assert all(torch.equal(x, y) for x, y in zip(got, reference))


def test_state_for_another_batch_size_is_refused() -> None:
    images = indexed_images(10)
    state = BatchIterator(images, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="batches of 4"):
        BatchIterator(images, 5, seed=0).load_state_dict(state)
