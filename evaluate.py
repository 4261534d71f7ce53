"""FID and Inception Score of a checkpoint's EMA samples, resumable:

    python evaluate.py --checkpoint runs/default/checkpoint.pt --num-samples 50000 --steps 1000
    python evaluate.py --checkpoint runs/fmnist/checkpoint.pt --features fashion-mnist --num-samples 2000 ...
    python evaluate.py --diffusers google/ddpm-cifar10-32 ...     # a diffusers model instead (export.py)

FID (Heusel et al. 2017) against the training set and IS (Salimans et al. 2016), as in Ho et al. 2020, Table 1.
Offline, for Fashion-MNIST: FID in the features of the project's own classifier (features.py) against the test
set, beside the real-data floor at the same number of images, and the class coverage.
Samples go to <checkpoint dir>/eval/samples_<steps>_..._<seed>/ (see `samples_folder`) in shards written atomically,
so an interrupted run continues where it stopped; the result, beside them, to a record of its own named by its
settings, <checkpoint dir>/eval/samples_<...>_n<num samples>_<features>.json (see `record_path`), and with
--metrics also to the file DVC reads (eval/dvc.yaml). The network is torch-fidelity's port of the TF FID
Inception (requirements-eval.txt), never downloaded from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

import config
import ddpm
import runtime
import sample
from checkpoint import CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint, write_json

PAPER = {"fid": 3.17, "is_mean": 9.46, "num_samples": 50_000, "steps": 1000, "dataset": "cifar10", "variance": "beta",
         "sampler": "ddpm", "clip": True}
# What a meta.json written before sampler, eta and spacing existed sampled with: its shards stay valid.
LEGACY_IDENTITY = {"sampler": "ddpm", "eta": 0.0, "spacing": "uniform"}
IS_SPLITS = 10           # Salimans et al.'s code: the score's mean and std over 10 parts
SEED_STRIDE = 2 ** 20    # shard k of --seed s uses generator seed s * SEED_STRIDE + k: seeds share no shard
MAX_SEED = 2 ** 40
INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the FID Inception; the stats cache key


class EvalError(Exception):
    """A problem found before anything is sampled; the message is one line and says what to do."""


class Extractor(Protocol):
    """uint8 images (B, 3, H, W) -> (pool features (B, D), logits (B, K)); `name` keys the stats cache."""
    name: str

    def __call__(self, images: Tensor) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]: ...


# ---------------------------------------------------------------- the math (numpy, float64)

def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), the Gaussian that FID fits (unbiased, as TTUR)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix; eigenvalues below 0 (rounding) count as 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017):
    ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    Tr((S1 S2)^{1/2}) is taken as Tr((√S1 S2 √S1)^{1/2}): the two matrices are similar, and the second is
    symmetric PSD, so its eigenvalues come from `eigvalsh`, real and stable even when S1 or S2 is singular
    (no eps * I retry, no complex parts to drop). Rounding below 0 is returned as 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if not (mu1.shape == mu2.shape == (d,) and s1.shape == s2.shape == (d, d)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
                         " (a reference made with another feature extractor?)")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) on each of `splits` consecutive parts, p(y) being the
    part's mean prediction; returns the mean and std over the parts. `logits` (N, K) are unnormalised
    log-probabilities, so log(probs) works too: a zero probability adds 0 · log 0 = 0."""
    z = np.asarray(logits, dtype=np.float64)
    n = z.shape[0] if z.ndim == 2 else 0
    if n < splits or splits < 1:
        raise ValueError(f"need logits (N, K) with N >= splits = {splits}, got shape {z.shape}")
    scores = []
    for i in range(splits):
        part = z[i * n // splits:(i + 1) * n // splits]
        shifted = part - part.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # log p(y|x)
        p = np.exp(log_p)
        py = p.mean(axis=0, keepdims=True)                                      # p(y) of this part
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (log_p - np.log(py)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- feature networks

def to_rgb(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) with C = 3, or C = 1 repeated to 3 (Inception takes RGB)."""
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] in (1, 3), (images.dtype, images.shape)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def extract_features(images: Tensor, extractor: Extractor, *, batch_size: int = 256, progress: bool = False,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Pool features (N, D) and logits (N, K), float64, of uint8 images (N, C, H, W), in batches."""
    from tqdm.auto import tqdm
    pools, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=f"{desc} ({extractor.name})", disable=not progress,
                      leave=False):
        pool, logit = extractor(to_rgb(images[start:start + batch_size]).contiguous())
        pools.append(torch.as_tensor(pool).detach().cpu().double().numpy())
        logits.append(torch.as_tensor(logit).detach().cpu().double().numpy())
    return np.concatenate(pools), np.concatenate(logits)


def image_scores(images: Tensor, ref_stats: tuple[np.ndarray, np.ndarray], extractor: Extractor, *,
                 batch_size: int = 256, progress: bool = False, classes: bool = False) -> dict:
    """FID of uint8 images (N, C, H, W) against the reference (mu, sigma), and their Inception Score; with
    `classes` (a classifier's logits, not Inception's), the class coverage instead of the IS."""
    pool, logits = extract_features(images, extractor, batch_size=batch_size, progress=progress,
                                    desc="sample features")
    fid = frechet_distance(*feature_stats(pool), *ref_stats)
    if classes:
        from features import class_coverage
        return {"fid": fid, "class_coverage": class_coverage(logits)}
    is_mean, is_std = inception_score(logits)
    return {"fid": fid, "is_mean": is_mean, "is_std": is_std}


class InceptionExtractor:
    """torch-fidelity's FID Inception v3 (the TF graph of 2015-12-05, with TF's resize to 299x299): 2048 pool3
    features for FID and the 1008 logits without bias for IS, as the original TF code computes them."""
    name = INCEPTION

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.net, self.device = net.to(device), device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(images.to(self.device))


def inception_extractor(device: torch.device | str = "cpu") -> InceptionExtractor:
    """Build the Inception extractor from the weight file in torch hub's cache, never downloading it: a missing
    package or weight file is an EvalError naming what to install or where to put the file."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as fe
    except ImportError:
        raise EvalError("torch-fidelity (the FID Inception network) is not installed: "
                        "pip install -r requirements-eval.txt") from None
    url = fe.URL_INCEPTION_V3
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]  # where torch.hub caches it
    if not path.is_file():
        raise EvalError(f"Inception weights missing: {path.name} must be at {path}; get it with "
                        f"`curl -L --create-dirs -o {path} {url}` (evaluate.py never downloads)")
    try:
        net = fe.FeatureExtractorInceptionV3(INCEPTION, ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=str(path))
    except Exception as e:  # truncated download, wrong file: all mean "get the file again"
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EvalError(f"{path}: cannot load the Inception weights ({reason}); download {url} again") from None
    return InceptionExtractor(net, torch.device(device))


def check_classifier_fits(image_size: int, what: str) -> None:
    """The Fashion-MNIST classifier scores the 28x28 garment: a model trained with data.crop above 2 makes smaller
    samples, which it cannot score (EvalError)."""
    from features import SIZE
    if image_size < SIZE:
        raise EvalError(f"{what}: its {image_size}x{image_size} samples are smaller than the {SIZE}x{SIZE} images the "
                        f"Fashion-MNIST classifier scores (data.crop at most 2)")


def feature_extractor(features: str, device: torch.device, stats_cache: str | Path, progress: bool) -> Extractor:
    """The network that `features` names: "fashion-mnist", the project's classifier (features.py, trained once and
    cached in `stats_cache`), else the FID Inception. What is missing is an EvalError."""
    if features != "fashion-mnist":
        return inception_extractor(device)
    from features import FeatureError, fashion_mnist_extractor
    try:
        return fashion_mnist_extractor(Path("data") / "fashion-mnist", stats_cache, progress=progress)
    except FeatureError as e:
        raise EvalError(str(e)) from None


# ---------------------------------------------------------------- reference images and their statistics

def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # missing, truncated, not a zip: one line
        raise EvalError(f"{path}: cannot read ({type(e).__name__}: {str(e)[:120]})") from None


def read_images(path: str | Path) -> Tensor:
    """uint8 (N, C, H, W) from a .npy dataset file (data.py's train.npy, NCHW), an .npz of NHWC images
    (key arr_0, as the openai/TTUR sample files) or a folder of PNG files."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image  # installed with torchvision
        files = sorted(path.glob("*.png"))
        if not files:
            raise EvalError(f"{path}: no .png files in this folder")
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # (H, W, 3) uint8 each
        if len({x.shape for x in images}) > 1:
            raise EvalError(f"{path}: the PNG files do not all have the same size")
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if path.suffix == ".npy":
        import data
        try:
            return data.load_dataset(path)
        except data.DataError as e:
            raise EvalError(str(e)) from None
    if path.suffix == ".npz":
        x = _read_npz(path).get("arr_0")
        if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
            raise EvalError(f"{path}: expected uint8 images (N, H, W, C) under key arr_0, or statistics mu and sigma")
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    raise EvalError(f"{path}: --ref must be a folder of PNGs, an .npz (images arr_0, or mu and sigma) or a .npy")


def default_ref(dataset: str, features: str) -> Path:
    """The reference when none is given: the test set for the Fashion-MNIST classifier, else the training set."""
    return Path("data") / dataset / ("test.npy" if features == "fashion-mnist" else "train.npy")


def _label(ref: Path) -> str:
    """A reference's name for file names: its folder and stem, e.g. cifar10-train."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in (ref.parent.name, ref.stem) if p))


def reference_stats(ref: str | Path, extractor: Extractor, *, cache_dir: str | Path, batch_size: int = 256,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference: read from an .npz of statistics, or computed from its images once and
    cached in `cache_dir` under a name keyed by the images' content hash and the extractor's name."""
    ref = Path(ref)
    if not ref.exists():
        raise EvalError(f"{ref}: reference not found")
    if ref.suffix == ".npz":
        z = _read_npz(ref)
        if "mu" in z and "sigma" in z:
            return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    images = read_images(ref)
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy())
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", extractor.name)
    cache = Path(cache_dir) / f"{_label(ref)}_{name}_{digest.hexdigest()[:16]}.npz"
    if cache.is_file():
        try:
            z = _read_npz(cache)
            return z["mu"], z["sigma"]
        except (EvalError, KeyError):
            pass  # unreadable cache: compute it again
    mu, sigma = feature_stats(extract_features(images, extractor, batch_size=batch_size, progress=progress,
                                                 desc="reference features")[0])
    atomic_save(cache, np.savez, mu=mu, sigma=sigma, num_images=len(images), source=str(ref))
    return mu, sigma


# ---------------------------------------------------------------- samples in shards, resumable

def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """sha256 of a state dict's names and bytes: which weights made a shard folder."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _claim(folder: Path, identity: dict) -> None:
    """Make `folder`'s shards belong to `identity`: stale shards (other weights or settings) are deleted."""
    meta = folder / "meta.json"
    try:
        old = json.loads(meta.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        old = {**LEGACY_IDENTITY, **old}
    if old == identity:
        return
    shards = sorted(folder.glob("shard_*.npy"))
    if shards and isinstance(old, dict) and old.get("batch_size") != identity["batch_size"] \
            and {**old, "batch_size": identity["batch_size"]} == identity:
        raise EvalError(f"{folder}: its {len(shards)} shards were sampled with --batch-size {old['batch_size']}; "
                        f"pass that to resume, or delete the folder to start over")
    if shards:
        print(f"note: {folder}: {len(shards)} shards of other weights or settings deleted", file=sys.stderr)
    for p in shards:  # before the new meta.json, so a crash in between cannot pass old shards as new
        p.unlink()
    write_json(meta, identity)


def _read_shard(path: Path, shape: tuple[int, ...]) -> Tensor | None:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return torch.from_numpy(x) if x.dtype == np.uint8 and x.shape == shape else None


SETTINGS = ("steps", "seed", "sampler", "eta", "spacing", "variance", "precision", "clip")  # samples_folder's


def samples_folder(steps: int, seed: int, sampler: str, eta: float, spacing: str, variance: str | None,
                   precision: str = "fp32", clip: bool = True) -> str:
    """The shard folder's name: every setting that changes the samples, so that no two settings share one.
    Clipped ancestral sampling on the uniform spacing in fp32 keeps the name it had before DDIM, spacings, bf16 and
    unclipped evaluations existed (samples_<steps>_<variance>_<seed>), so shards sampled then are still found."""
    how = {"ddpm": variance, "ddim": f"ddim-eta{eta!r}"}.get(sampler, sampler)
    return f"samples_{steps}{'' if spacing == 'uniform' else '_' + spacing}_{how}_{seed}" \
        + ("" if precision == "fp32" else f"_{precision}") + ("" if clip else "_noclip")


def sample_shards(source: Source, plan: Plan, *, generate: Callable[..., Tensor] = sample.generate,
                  progress: bool = False) -> Tensor:
    """The first `plan.num_samples` images, uint8 (N, C, H, W), of shards of `plan.batch_size` images in the folder
    of `source.out_dir`/eval/ that `samples_folder` names, generating only the missing ones. Shard k is one batch
    with generator seed `plan.seed * SEED_STRIDE + k`, so the shards equal `generate(model, schedule, k * batch_size,
    plan.sampling, batch_size=batch_size, seed=plan.seed * SEED_STRIDE)` however often the run stopped, and a
    smaller --num-samples evaluates a prefix of a larger one."""
    from tqdm.auto import tqdm
    model, n, b = source.model.to(plan.device), plan.num_samples, plan.batch_size
    folder = source.out_dir / "eval" / samples_folder(**plan.settings)
    _claim(folder, shard_identity(source, plan))
    shape = (b, model.in_channels, model.image_size, model.image_size)
    inference = sample.Inference(plan.device, plan.precision, progress=progress)
    out = []
    with tqdm(total=n, desc="samples", unit="img", disable=not progress) as bar:
        for k in range(-(-n // b)):
            path = folder / f"shard_{k:05d}.npy"
            x = _read_shard(path, shape)
            if x is None:
                x = generate(model, source.schedule, b, settings=plan.sampling, batch_size=b,
                             seed=plan.seed * SEED_STRIDE + k, inference=inference)
                atomic_save(path, np.save, x.numpy())
            out.append(x)
            bar.update(min(b, n - k * b))
    return torch.cat(out)[:n]


def shard_identity(source: Source, plan: Plan) -> dict:
    """What a shard folder's meta.json says its shards are (`_claim`): which weights sampled them, how they are
    seeded and cut, and every setting they depend on."""
    model = source.model
    return {"checkpoint_step": source.step, "ema_sha256": weights_digest(source.weights), "seed_stride": SEED_STRIDE,
            "batch_size": plan.batch_size, "image_shape": [model.in_channels, model.image_size, model.image_size],
            **{k: v for k, v in plan.settings.items() if (k, v) != ("precision", "fp32")}}  # fp32: as before bf16


# ---------------------------------------------------------------- an evaluation: its settings, model, plan and record

@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measures, as evaluate.py's flags name it (their defaults, but for the paper's variance beta).
    `steps` to `clip` are ddpm.Sampling's fields as add_sampler_arguments gives them (`clip` None: the checkpoint's
    sample.clip); `precision` auto is bf16 where it is native; `ref` None is the default reference (`default_ref`)."""
    num_samples: int = PAPER["num_samples"]
    steps: int | None = None
    sampler: str = PAPER["sampler"]
    eta: float = 0.0
    spacing: str = "uniform"
    variance: str = PAPER["variance"]
    clip: bool | None = None
    seed: int = 0
    batch_size: int = 256  # for sampling and features, and the shard size
    precision: str = "fp32"
    features: str = "inception"
    ref: str | Path | None = None
    stats_cache: str | Path = "data/fid_stats"
    device: str | torch.device = "auto"


@dataclass(frozen=True)
class Source:
    """The model an evaluation samples (on the CPU until it samples): a checkpoint's EMA weights or a diffusers
    model, its schedule, and where its results go."""
    name: str                     # the checkpoint's path, or the diffusers folder or hub id
    model: torch.nn.Module
    schedule: ddpm.Schedule
    state: dict | None            # the checkpoint; None for a diffusers model
    weights: dict[str, Tensor]    # the state dict that names the shards (`weights_digest`)
    dataset: str
    out_dir: Path                 # `results_dir`

    @property
    def step(self) -> int | None:
        return None if self.state is None else self.state["step"]


def load_source(checkpoint_path: str | Path | None, diffusers: str | None, ref: str | Path | None) -> Source:
    """The checkpoint's EMA model, or with `diffusers` (a folder or hub id) that model, taken for CIFAR-10's as its
    3x32x32 images suggest: other images need a `ref`."""
    if diffusers is None:
        state = load_checkpoint(checkpoint_path, advice="(is it a checkpoint.pt written by train.py?)")
        return Source(str(checkpoint_path), model_from_checkpoint(state, ema=True),
                      sample.schedule_from_config(state["config"]), state, state["ema"],
                      state["config"]["data"]["dataset"], results_dir(checkpoint_path))
    from export import load_diffusers
    model, schedule = load_diffusers(diffusers)
    if ref is None and (model.in_channels, model.image_size) != (3, 32):
        raise EvalError(f"{diffusers}: its {model.in_channels}x{model.image_size}x{model.image_size} images are "
                        f"not CIFAR-10's: pass --ref")
    return Source(diffusers, model, schedule, None, model.state_dict(), "cifar10", results_dir(None, diffusers))


def results_dir(checkpoint_path: str | Path | None, diffusers: str | None = None) -> Path:
    """Where eval/ (shards and records) goes: beside the checkpoint; in a diffusers model's folder, or for a hub id in
    runs/diffusers/<owner>--<name>."""
    if diffusers is None:
        return Path(checkpoint_path).parent
    return Path(diffusers) if Path(diffusers).is_dir() else Path("runs/diffusers") / diffusers.replace("/", "--")


@dataclass(frozen=True)
class Plan:
    """An evaluation checked against its model and resolved (`plan_evaluation`): the samples it draws and how it
    scores them."""
    sampling: ddpm.Sampling  # steps, variance and spacing resolved, as the samples depend on them
    num_samples: int
    batch_size: int
    seed: int
    precision: str           # fp32 or bf16
    device: torch.device
    features: str            # inception or fashion-mnist
    ref: Path

    @property
    def settings(self) -> dict:
        """The settings that name the samples (`SETTINGS`); the variance only where it applies, to ancestral
        sampling."""
        s = self.sampling
        return {"steps": s.steps, "seed": self.seed, "sampler": s.sampler, "eta": s.eta, "spacing": s.spacing,
                "variance": s.variance if s.sampler == "ddpm" else None, "precision": self.precision, "clip": s.clip}


def plan_evaluation(e: Evaluation, source: Source) -> Plan:
    """`e` checked against the model (a bad setting is a ValueError that names its flag, a missing reference an
    EvalError) and resolved: all T steps by default, the variance that auto stands for, the one spacing of all T
    steps, the device and the precision, the reference."""
    T = source.schedule.num_timesteps
    s = sample.sampler_settings(vars(e), source.state, T)
    if e.num_samples < IS_SPLITS or e.batch_size < 1:
        raise ValueError(f"--num-samples must be >= {IS_SPLITS} (the IS splits) and --batch-size >= 1")
    if not 0 <= e.seed < MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**40), got {e.seed}")
    steps = T if s.steps is None else s.steps
    s = dataclasses.replace(s, steps=steps, variance=ddpm.resolve_variance(s.variance, steps, T),
                            spacing=s.spacing if steps < T else "uniform")
    try:
        device = runtime.resolve_device(e.device)
    except ValueError as err:
        raise ValueError(f"--device {err}") from None
    if e.precision not in runtime.SAMPLING_PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(runtime.SAMPLING_PRECISIONS)}, got {e.precision!r}")
    if e.features not in ("inception", "fashion-mnist"):
        raise ValueError(f"--features must be inception or fashion-mnist, got {e.features!r}")
    if e.features == "fashion-mnist" and source.dataset != "fashion-mnist":
        raise EvalError(f"--features fashion-mnist scores Fashion-MNIST samples; {source.name} was trained on "
                        f"{source.dataset}")
    if e.features == "fashion-mnist":
        check_classifier_fits(source.model.image_size, source.name)
    ref = default_ref(source.dataset, e.features) if e.ref is None else Path(e.ref)
    if not ref.exists():
        raise EvalError(f"{ref}: reference not found" + ("" if ref.suffix != ".npy" else
                        f"; run `python data.py --config config.yaml data.dataset={source.dataset}` first, or pass "
                        f"--ref"))
    return Plan(s, e.num_samples, e.batch_size, e.seed, runtime.resolve_precision(e.precision, device), device,
                e.features, ref)


def score_samples(images: Tensor, plan: Plan, ref_stats: tuple[np.ndarray, np.ndarray], extractor: Extractor,
                  dataset: str, progress: bool) -> dict:
    """FID and IS of the samples; with the Fashion-MNIST classifier's features, the class coverage instead of the
    IS and the real-data floor: the same scores for as many real training images, what a perfect model would get."""
    classes = plan.features == "fashion-mnist"
    scores = image_scores(images, ref_stats, extractor, batch_size=plan.batch_size, progress=progress,
                          classes=classes)
    if classes:
        from features import METRIC
        real = read_images(Path("data") / dataset / "train.npy")[:plan.num_samples]
        floor = image_scores(real, ref_stats, extractor, batch_size=plan.batch_size, classes=True)
        scores.update(metric=METRIC, fid_floor=floor["fid"], fid_over_floor=scores["fid"] / max(floor["fid"], 1e-12),
                      floor_class_coverage=floor["class_coverage"], floor_num_images=len(real),
                      classifier_test_accuracy=getattr(extractor, "test_accuracy", None))
    return scores


def paper_differences(*, num_samples: int, steps: int, dataset: str, sampler: str, variance: str | None,
                      clip: bool = True) -> list[str]:
    """Why a result is not comparable with Ho et al. 2020, Table 1 (empty: it is); `variance` is resolved."""
    return ([f"{num_samples} samples"] * (num_samples < PAPER["num_samples"])
            + [f"{steps} steps"] * (steps < PAPER["steps"]) + [f"dataset {dataset}"] * (dataset != PAPER["dataset"])
            + [f"sampler {sampler}"] * (sampler != PAPER["sampler"])
            + [f"variance {variance}"] * (sampler == PAPER["sampler"] and variance != PAPER["variance"])
            + ["x0 not clipped"] * (clip != PAPER["clip"]))


def record_path(out_dir: str | Path, result: dict) -> Path:
    """Where an evaluation's result goes, beside its shards: `<out_dir>/eval/<shard folder>_n<num_samples>_<features>
    .json`, plus `_ref-<name>` for a --ref other than the default. Every setting that changes the score is in the
    name, so no evaluation overwrites another's record; it is made from the result alone, so a record names itself."""
    ref = Path(result["ref"])
    ref_tag = "" if ref == default_ref(result["dataset"], result["features"]) else f"_ref-{_label(ref)}"
    folder = samples_folder(**{k: result[k] for k in SETTINGS})
    return Path(out_dir) / "eval" / f"{folder}_n{result['num_samples']}_{result['features']}{ref_tag}.json"


def make_record(scores: dict, plan: Plan, source: Source, extractor: Extractor) -> dict:
    """The result of an evaluation: its scores, every setting, and whether it is comparable with the paper."""
    settings = plan.settings
    reasons = [f"{plan.features} features (not Inception FID)"] * (plan.features == "fashion-mnist") + \
        paper_differences(num_samples=plan.num_samples, steps=settings["steps"], dataset=source.dataset,
                          sampler=settings["sampler"], variance=settings["variance"], clip=settings["clip"])
    paper = (f"the paper (Ho et al. 2020, Table 1: FID {PAPER['fid']}, IS {PAPER['is_mean']} from "
             f"{PAPER['num_samples']} samples of {PAPER['steps']} ancestral steps with variance beta on CIFAR-10, FID "
             f"against the training set)")
    return {**scores, **settings, "num_samples": plan.num_samples, "features": plan.features,
            "batch_size": plan.batch_size, "checkpoint_step": source.step, "dataset": source.dataset,
            "weights": "ema" if source.state is not None else f"diffusers {source.name}",
            "ref": str(plan.ref), "extractor": extractor.name, "comparable_with_paper": not reasons,
            "note": f"comparable with {paper}" if not reasons else f"NOT comparable with {paper}: {', '.join(reasons)}"}


def evaluate(checkpoint_path: str | Path | None, settings: Evaluation = Evaluation(), *, diffusers: str | None = None,
             extractor: Extractor | None = None, generate: Callable[..., Tensor] = sample.generate,
             progress: bool = True, **overrides) -> dict:
    """FID and IS of `num_samples` EMA samples of the checkpoint, as `settings` says with any of its fields replaced
    by `overrides` (`evaluate(path, num_samples=5000, steps=100)`); writes the result to `record_path` and returns it.
    `ref` defaults to the training set, data/<dataset>/train.npy; `extractor` to the network `features` names.
    `features="fashion-mnist"`: the classifier of features.py instead (offline), FID against the test set
    data/fashion-mnist/test.npy, the real-data floor and the class coverage instead of the IS (`score_samples`).
    Everything that can fail on setup (checkpoint, settings, extractor, reference) does so before any sampling.
    With `diffusers` (a diffusers model's folder or hub id, instead of a checkpoint), `ref` defaults to CIFAR-10's
    for 3x32x32 images; see `results_dir` for where the results go. `precision` (fp32, bf16, or auto: bf16 where it is
    native, runtime.resolve_precision) is the sampler's: bf16 samples are other samples, in a folder of their own.
    `clip` (the predicted x0 to [-1, 1]) defaults to the checkpoint's sample.clip, the rule FID during training
    follows (`training_scorer`); a diffusers model clips, as its DDPMScheduler does by default."""
    e = dataclasses.replace(settings, **overrides)
    source = load_source(checkpoint_path, diffusers, e.ref)
    plan = plan_evaluation(e, source)
    if extractor is None:
        extractor = feature_extractor(plan.features, plan.device, e.stats_cache, progress)
    ref_stats = reference_stats(plan.ref, extractor, cache_dir=e.stats_cache, batch_size=plan.batch_size,
                                progress=progress)
    images = sample_shards(source, plan, generate=generate, progress=progress)
    scores = score_samples(images, plan, ref_stats, extractor, source.dataset, progress)
    result = make_record(scores, plan, source, extractor)
    write_json(record_path(source.out_dir, result), result)
    return result


# ---------------------------------------------------------------- FID during training

def training_scorer(cfg: config.Config, device: torch.device, *, stats_cache: str | Path = "data/fid_stats",
                    progress: bool = True) -> Callable[[torch.nn.Module, int], dict]:
    """For train.py's `eval.every_epochs`: a function (EMA model, seed) -> {"fid", and "class_coverage" or
    "is_mean"} that scores `eval.num_samples` samples of the sample.* sampler. `eval.features` auto is the
    Fashion-MNIST classifier (against the test set) for Fashion-MNIST and the FID Inception (against the training
    set) for CIFAR-10. Everything it needs is built now: a missing piece is an EvalError before training starts."""
    features = cfg.eval.features if cfg.eval.features != "auto" else \
        ("fashion-mnist" if cfg.data.dataset == "fashion-mnist" else "inception")
    if features == "fashion-mnist":
        check_classifier_fits(config.image_size(cfg), f"data.crop {cfg.data.crop}")
    extractor = feature_extractor(features, device, stats_cache, progress)
    ref_stats = reference_stats(default_ref(cfg.data.dataset, features), extractor, cache_dir=stats_cache,
                                progress=progress)
    schedule = sample.schedule_from_config({"diffusion": dataclasses.asdict(cfg.diffusion)})

    def score(model: torch.nn.Module, seed: int) -> dict:
        images = sample.generate(model, schedule, cfg.eval.num_samples, cfg.sample.sampling, seed=seed,
                                 inference=sample.Inference(device))
        return image_scores(images, ref_stats, extractor, classes=features == "fashion-mnist")
    return score


# ---------------------------------------------------------------- the command line

def summary(result: dict, path: str | Path) -> str:
    """The one line main() prints."""
    how = {"ddpm": f"variance {result['variance']}", "ddim": f"DDIM eta {result['eta']}",
           "dpm++2m-sde": "SDE-DPM-Solver++(2M)"}.get(result.get("sampler", "ddpm"), "DPM-Solver++(2M)")
    how += f", {result['precision']}" if result.get("precision", "fp32") != "fp32" else ""
    how += ", x0 not clipped" if not result.get("clip", True) else ""
    spacing = f" {result['spacing']}" if result.get("spacing", "uniform") != "uniform" else ""
    if "metric" in result:
        return (f"{result['metric']}: {result['fid']:.3f} (real-data floor {result['fid_floor']:.3f} at "
                f"{result['floor_num_images']} images, ratio {result['fid_over_floor']:.2f}), class coverage "
                f"{result['class_coverage']:.2f} of 10 (real: {result['floor_class_coverage']:.2f}); classifier test "
                f"accuracy {result['classifier_test_accuracy']:.2%} ({result['num_samples']} samples, "
                f"{result['steps']}{spacing} steps, {how}, seed {result['seed']}, checkpoint step "
                f"{result['checkpoint_step']}); not comparable with Inception FIDs -> {path}")
    return (f"FID {result['fid']:.2f}  IS {result['is_mean']:.2f} ± {result['is_std']:.2f}  "
            f"({result['num_samples']} samples, {result['steps']}{spacing} steps, {how}, seed "
            f"{result['seed']}, " + (f"checkpoint step {result['checkpoint_step']}" if result["checkpoint_step"]
                                     is not None else result["weights"]) + f") {result['note']} -> {path}")


def main(argv: list[str] | None = None) -> None:
    from config import fail
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint.pt written by train.py")
    source.add_argument("--diffusers", metavar="PATH_OR_ID", help="a diffusers UNet2DModel or DDPMPipeline (folder or "
                        "hub id) instead, e.g. google/ddpm-cifar10-32 (pip install -r requirements-bench.txt)")
    p.add_argument("--num-samples", type=int, default=PAPER["num_samples"], help="50000 for the paper's numbers")
    sample.add_sampler_arguments(p)  # --steps, --sampler, --eta, --spacing, --variance, --clip / --no-clip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="sampling and Inception batch (also the shard size)")
    p.add_argument("--ref", default=None, help="reference: PNG folder, .npz of images (arr_0, NHWC) or of mu and "
                   "sigma, or a .npy (default: the checkpoint's training set, data/<dataset>/train.npy)")
    p.add_argument("--stats-cache", default="data/fid_stats", help="folder for cached reference statistics")
    p.add_argument("--features", choices=["inception", "fashion-mnist"], default="inception",
                   help="inception: FID Inception (needs its weights); fashion-mnist: the project's own classifier, "
                   "offline (FID against data/fashion-mnist/test.npy, with the real-data floor)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=runtime.SAMPLING_PRECISIONS, default="fp32",
                   help="the sampler's: fp32 (default: exact, the samples the FID is usually reported for), bf16, or "
                        "auto = bf16 where it is native (CUDA GPUs with bf16, CPUs with AMX-BF16), else fp32")
    p.add_argument("--metrics", default=None, help="also write the result to this file: the one DVC reads "
                   "(eval/dvc.yaml passes <out_dir>/eval.json); the record named by its settings is written anyway")
    args = p.parse_args(argv)
    settings = Evaluation(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Evaluation)})
    try:
        result = evaluate(args.checkpoint, settings, diffusers=args.diffusers)
    except (EvalError, CheckpointError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; the shards written so far are kept: run the same command again to resume", 130)
    where = str(record_path(results_dir(args.checkpoint, args.diffusers), result))
    if args.metrics:
        write_json(args.metrics, result)
        where += f" and {args.metrics}"
    print(summary(result, where))


if __name__ == "__main__":
    main()
