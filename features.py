"""An offline sample-quality metric for Fashion-MNIST: FID in the feature space of a small classifier that the
project trains itself, deterministically, from data/fashion-mnist/train.npy (no download, no Inception weights).

The numbers are "FID (Fashion-MNIST classifier features)": useful to compare runs and samplers with each other and
with the real-data floor (real training images scored the same way), never comparable with published Inception
FIDs. The classifier (three conv-BN-ReLU-pool stages and a 128-unit layer, ~0.1M parameters) sees the 28x28 image
inside data.py's 2-pixel zero padding; its 128 penultimate ReLU activations are the features, its 10 logits give
the class coverage (`class_coverage`).

The recipe is fixed (`RECIPE`) and runs on one CPU thread with a fixed seed, so the classifier is the same bit for
bit on a given machine; it is trained once (~1-2 minutes on one core) and cached in `data/fid_stats/`, keyed by the
data's hash and the recipe.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = 28  # the classifier's input: Fashion-MNIST's own images, without data.py's 2-pixel padding
RECIPE = {"version": 1, "width": 16, "features": 128, "epochs": 4, "batch_size": 128, "max_lr": 2e-3, "seed": 0,
          "crop": 2, "random_flip": True, "threads": 1}  # crop: the padding of the 32x32 images it trains on
MIN_ACCURACY = 0.90  # small CNNs reach 91-93% on Fashion-MNIST; below this the features are not trusted
METRIC = "FID (Fashion-MNIST classifier features)"


class FeatureError(Exception):
    """The classifier cannot be built or trusted; one line."""


class Classifier(nn.Module):
    """uint8-derived images (B, 1, 28, 28) in [-1, 1] -> (features (B, F), logits (B, 10))."""

    def __init__(self, width: int = 16, features: int = 128, num_classes: int = 10):
        super().__init__()
        stages = []
        c_in = 1
        for c in (width, 2 * width, 4 * width):  # 28 -> 14 -> 7 -> 3
            stages += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*stages, nn.Flatten(), nn.Linear(c_in * 9, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert x.ndim == 4 and x.shape[1:] == (1, 28, 28), f"expected (B, 1, 28, 28), got {tuple(x.shape)}"
        f = self.body(x)
        return f, self.head(f)


def to_input(images: Tensor) -> Tensor:
    """uint8 (B, C, H, H), C = 1 or 3 identical channels, the garment centred (32x32 as data.py prepares it, or down
    to 28x28 from a model trained with data.crop) -> float (B, 1, 28, 28) in [-1, 1], the border cut."""
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] in (1, 3), (images.dtype, images.shape)
    assert images.shape[2] == images.shape[3] >= SIZE, f"expected H = W >= {SIZE}, got {tuple(images.shape)}"
    b = (images.shape[2] - SIZE) // 2
    x = images[:, :1, b:b + SIZE, b:b + SIZE]
    return x.float() / 127.5 - 1.0


class _Threads:
    """Run a block with a fixed number of intra-op threads (results are bitwise stable only for a fixed count)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


def train_classifier(images: Tensor, labels: Tensor, recipe: dict = RECIPE, *, progress: bool = False) -> Classifier:
    """The classifier trained by `recipe` on uint8 images (N, C, 32, 32) and labels (N,): Adam with a one-cycle
    learning rate, random flips, fixed seed and thread count. Deterministic: same inputs, same weights."""
    assert len(images) == len(labels) > 0, (images.shape, labels.shape)
    assert images.shape[2] - 2 * recipe["crop"] == SIZE, f"expected images padded by {recipe['crop']}: {images.shape}"
    from tqdm.auto import tqdm
    with _Threads(recipe["threads"]):
        g = torch.Generator().manual_seed(recipe["seed"])
        torch.manual_seed(recipe["seed"])
        model = Classifier(recipe["width"], recipe["features"])
        bs = recipe["batch_size"]
        per_epoch = max(1, len(images) // bs)  # full batches only: BatchNorm gets no tiny last batch
        opt = torch.optim.Adam(model.parameters(), lr=recipe["max_lr"])
        lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["max_lr"], total_steps=recipe["epochs"] * per_epoch)
        y_all = labels.long()
        model.train()
        with tqdm(total=recipe["epochs"] * per_epoch, desc="training the Fashion-MNIST feature classifier",
                  unit="step", disable=not progress, leave=False) as bar:
            for _ in range(recipe["epochs"]):
                perm = torch.randperm(len(images), generator=g)
                flip = torch.rand(len(images), generator=g) < 0.5
                for i in range(per_epoch):
                    idx = perm[i * bs:(i + 1) * bs]
                    x = to_input(images[idx])
                    if recipe["random_flip"]:
                        x = torch.where(flip[idx, None, None, None], x.flip(3), x)
                    loss = F.cross_entropy(model(x)[1], y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    lr.step()
                    bar.update()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: Classifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Features (N, F) and logits (N, 10), float32, of uint8 images (N, C, H, H) (`to_input`)."""
    outs = [model(to_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in outs]), torch.cat([z for _, z in outs])


def accuracy(model: Classifier, images: Tensor, labels: Tensor) -> float:
    return float((predict(model, images)[1].argmax(1) == labels.long()).double().mean())


def class_coverage(logits: np.ndarray | Tensor) -> float:
    """exp(entropy of the mean predicted class distribution): 10 when the samples spread evenly over the 10
    classes, 1 when every sample is predicted as one class (mode collapse)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = torch.softmax(z, dim=1).mean(0)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


class FashionMNISTExtractor:
    """evaluate.py's Extractor: uint8 (B, C, H, H), 28 <= H <= 32 (`to_input`) -> (features (B, 128), logits (B, 10)).
    `name` keys the stats cache, so statistics of one classifier are never used with another."""

    def __init__(self, model: Classifier, key: str, test_accuracy: float):
        self.model, self.test_accuracy = model, test_accuracy
        self.name = f"fmnist-classifier-{key}"

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with _Threads(RECIPE["threads"]):  # features bitwise independent of the caller's thread count
            return predict(self.model, images.cpu())


def _digest(data_dir: Path, recipe: dict) -> str:
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for name in ("train.npy", "train_labels.npy", "test.npy", "test_labels.npy"):
        h.update(name.encode())
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()[:16]


def fashion_mnist_extractor(data_dir: str | Path = "data/fashion-mnist", cache_dir: str | Path = "data/fid_stats",
                            *, recipe: dict = RECIPE, progress: bool = False,
                            min_accuracy: float = MIN_ACCURACY) -> FashionMNISTExtractor:
    """The classifier for `data_dir` (train.npy, train_labels.npy, test.npy, test_labels.npy), from the cache or
    trained now and cached; its test accuracy must reach `min_accuracy`."""
    import data
    from checkpoint import atomic_write
    data_dir = Path(data_dir)
    try:
        images, labels = data.load_dataset(data_dir / "train.npy"), data.load_labels(data_dir / "train.npy")
        test, test_labels = data.load_dataset(data_dir / "test.npy"), data.load_labels(data_dir / "test.npy")
    except data.DataError as e:
        raise FeatureError(f"{e} (the Fashion-MNIST features need data/fashion-mnist: "
                           f"python data.py --config config.yaml data.dataset=fashion-mnist)") from None
    if images.shape[1:] != (1, 32, 32) or test.shape[1:] != (1, 32, 32):
        raise FeatureError(f"{data_dir}: expected Fashion-MNIST images (N, 1, 32, 32), got {tuple(images.shape)}")
    key = _digest(data_dir, recipe)
    cache = Path(cache_dir) / f"fmnist-classifier_{key}.pt"
    model = Classifier(recipe["width"], recipe["features"])
    state = None
    if cache.is_file():
        try:
            state = torch.load(cache, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
        except Exception:  # unreadable or foreign cache file: train again
            state = None
    if state is None:
        model = train_classifier(images, labels, recipe, progress=progress)
        state = {"model": model.state_dict(), "recipe": recipe,
                 "test_accuracy": accuracy(model, test, test_labels), "num_train": len(images)}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(cache, buf.getvalue())
    model.eval().requires_grad_(False)
    acc = float(state["test_accuracy"])
    if not math.isfinite(acc) or acc < min_accuracy:
        raise FeatureError(f"{cache}: the feature classifier reaches only {acc:.1%} test accuracy (needs "
                           f"{min_accuracy:.0%}); is {data_dir} the real Fashion-MNIST?")
    return FashionMNISTExtractor(model, key, acc)
