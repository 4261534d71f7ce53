"""evaluate.py: the FID and IS math against closed forms and independent computations, and the whole
evaluation (resume, stale shards, reference cache, CLI errors) with a small deterministic feature extractor
injected in place of Inception, so nothing here needs the Inception weights."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import config
import evaluate as ev
import sample
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from helpers import ROOT, TinyExtractor, make_checkpoint, one_error_line, require

KEYS = {"fid", "is_mean", "is_std", "num_samples", "steps", "variance", "seed", "checkpoint_step",
        "comparable_with_paper", "note"}


# ---------------------------------------------------------------- frechet_distance

def random_spd(rng: np.random.Generator, d: int, rank: int | None = None, eps: float = 1e-3) -> np.ndarray:
    x = rng.standard_normal((d, rank or d))
    return x @ x.T / (rank or d) + eps * np.eye(d)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) from the eigenvalues of the non-symmetric product (as torch-fidelity does)."""
    return float(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum())


@settings(max_examples=30)
@given(d=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_frechet_diagonal_closed_form(d: int, seed: int) -> None:
    """Commuting (diagonal) covariances: the trace term is sum (sqrt a - sqrt b)²."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    a[rng.random(d) < 0.3] = 0.0  # some variances exactly 0: singular covariances
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-10)


@settings(max_examples=30)
@given(d=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_frechet_general_spd_matches_independent_computation(d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert ev.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9, abs=1e-12)  # symmetric
    assert ev.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))


def test_frechet_matches_scipy_sqrtm() -> None:
    linalg = require("scipy.linalg")
    rng = np.random.default_rng(0)
    for d in (2, 7, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-8])
def test_frechet_near_singular(eps: float) -> None:
    """Rank-deficient covariances (more dimensions than samples, as with 2048-d features of few images):
    the result is real, finite and exact where the answer is known in closed form."""
    rng = np.random.default_rng(1)
    d, r = 64, 5
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = np.concatenate([rng.uniform(0.5, 2, r), np.zeros(d - r)]) + eps
    b = np.concatenate([rng.uniform(0.5, 2, r + 3), np.zeros(d - r - 3)]) + eps
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting, in a random basis
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    low = random_spd(rng, d, rank=r, eps=eps)  # general rank-r covariance: identical inputs give 0
    assert ev.frechet_distance(mu1, low, mu1, low) == pytest.approx(0.0, abs=1e-9)
    assert ev.frechet_distance(mu1, low, mu2, s2) == pytest.approx(ev.frechet_distance(mu2, s2, mu1, low), rel=1e-8)


def test_frechet_matches_torch_fidelity() -> None:
    metric_fid = require("torch_fidelity.metric_fid")
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((300, 20)), rng.standard_normal((200, 20)) * 1.3 + 0.2
    mu1, s1 = ev.feature_stats(f1)
    mu2, s2 = ev.feature_stats(f2)
    theirs = metric_fid.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)


def test_frechet_rejects_mismatched_statistics() -> None:
    with pytest.raises(ValueError, match="do not match"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats() -> None:
    f = np.random.default_rng(3).standard_normal((50, 4))
    mu, sigma = ev.feature_stats(f)
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f.T)) and sigma.shape == (4, 4)
    assert ev.feature_stats(f[:, :1])[1].shape == (1, 1)
    with pytest.raises(ValueError):
        ev.feature_stats(f[:1])


# ---------------------------------------------------------------- inception_score

def test_inception_score_uniform_is_one() -> None:
    mean, std = ev.inception_score(np.zeros((100, 7)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 10, 100])
def test_inception_score_confident_and_evenly_spread_is_k(k: int) -> None:
    labels = np.arange(10 * k * 2) % k  # every split holds every class equally often
    onehot = np.eye(k)[labels]
    with np.errstate(divide="ignore"):
        for logits in (onehot * 1e4, np.log(onehot)):  # logits, and log-probabilities with exact zeros
            mean, std = ev.inception_score(logits, splits=10)
            assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=20)
@given(k=st.integers(2, 20), seed=st.integers(0, 2**32 - 1))
def test_inception_score_bounds_and_shift_invariance(k: int, seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((40, k)) * 3
    mean, _ = ev.inception_score(logits, splits=4)
    assert 1.0 - 1e-9 <= mean <= k + 1e-9
    assert ev.inception_score(logits + 5.0, splits=4)[0] == pytest.approx(mean, rel=1e-12)


def test_inception_score_matches_torch_fidelity() -> None:
    metric_isc = require("torch_fidelity.metric_isc")
    logits = np.random.default_rng(4).standard_normal((500, 30)) * 2
    theirs = metric_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = ev.inception_score(logits, splits=10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-8)


# ---------------------------------------------------------------- the evaluation, with a small extractor

def smooth_images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    """Image-like uint8 (n, C, 32, 32): random 4x4 colour fields upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    return (F.interpolate(low, size=32, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def noise_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fid_of_images_against_themselves_and_noise() -> None:
    ext = TinyExtractor()
    real = smooth_images(64, seed=0)
    ref = ev.feature_stats(ev.extract_features(real, ext, batch_size=16)[0])
    same = ev.image_scores(real, ref, ext)["fid"]
    other = ev.image_scores(smooth_images(64, seed=1), ref, ext)["fid"]
    noise = ev.image_scores(noise_images(64, seed=2), ref, ext)["fid"]
    assert same == pytest.approx(0.0, abs=1e-9)
    assert noise > 10 * other > 0


def test_grayscale_is_repeated_to_rgb() -> None:
    ext = TinyExtractor()
    gray = smooth_images(12, seed=3, channels=1)
    pool, logits = ev.extract_features(gray, ext, batch_size=5)
    pool3, logits3 = ev.extract_features(gray.repeat(1, 3, 1, 1), ext, batch_size=12)
    assert pool.shape == (12, 16) and logits.shape == (12, 10)
    assert np.allclose(pool, pool3) and np.allclose(logits, logits3)


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint.pt")
    ref = tmp_path / "ref.npz"
    np.savez(ref, smooth_images(32, seed=5).permute(0, 2, 3, 1).numpy())
    return {"ckpt": ckpt, "ref": ref, "cache": tmp_path / "stats"}


class CountingGenerate:
    """sample.generate, counting calls and optionally crashing on call number `crash_at`."""

    def __init__(self, crash_at: int | None = None):
        self.calls, self.seeds, self.clips, self.crash_at = 0, [], [], crash_at

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        self.seeds.append(kwargs["seed"])
        self.clips.append(kwargs["settings"].clip)
        return sample.generate(*args, **kwargs)


def run_eval(s: dict, ckpt: Path | None = None, **kw) -> dict:
    args = dict(num_samples=16, steps=5, batch_size=4, seed=3, variance="beta", ref=s["ref"], device="cpu",
                extractor=TinyExtractor(), progress=False, stats_cache=s["cache"])
    return ev.evaluate(ckpt or s["ckpt"], **{**args, **kw})


def records(run: Path) -> dict[str, dict]:
    """The evaluation records of a run folder, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted((run / "eval").glob("*.json"))}


def test_evaluate_writes_its_record_and_shards_equal_one_generate_call(setup: dict) -> None:
    gen = CountingGenerate()
    result = run_eval(setup, generate=gen)
    # named by its shard folder, its number of samples, its features and (not the default) its reference
    name = f"samples_5_beta_3_n16_inception_ref-{setup['ref'].parent.name}-ref.json"
    assert ev.record_path(setup["ckpt"].parent, result) == setup["ckpt"].parent / "eval" / name
    saved = records(setup["ckpt"].parent)[name]
    assert saved == result and KEYS <= set(saved)
    assert np.isfinite(saved["fid"]) and saved["fid"] > 0 and 1 <= saved["is_mean"] <= 10
    assert saved["comparable_with_paper"] is False and saved["note"].startswith("NOT comparable")
    assert saved["note"].endswith(": 16 samples, 5 steps")
    assert (saved["num_samples"], saved["steps"], saved["checkpoint_step"], saved["seed"]) == (16, 5, 100, 3)
    folder = setup["ckpt"].parent / "eval" / "samples_5_beta_3"
    assert sorted(p.name for p in folder.glob("shard_*.npy")) == [f"shard_{k:05d}.npy" for k in range(4)]
    assert gen.calls == 4 and gen.seeds == [3 * ev.SEED_STRIDE + k for k in range(4)]
    # the shards are exactly one generate call with the base seed: no dependence on how the run was cut
    state = load_checkpoint(setup["ckpt"])
    direct = sample.generate(model_from_checkpoint(state), sample.schedule_from_config(state["config"]), 16,
                             batch_size=4, steps=5, variance="beta", seed=3 * ev.SEED_STRIDE)
    shards = torch.cat([torch.from_numpy(np.load(folder / f"shard_{k:05d}.npy")) for k in range(4)])
    assert torch.equal(shards, direct)


def test_evaluate_resumes_after_a_crash(setup: dict, tmp_path: Path) -> None:
    reference = run_eval(setup)
    other = make_checkpoint(tmp_path / "other" / "checkpoint.pt")  # same weights, fresh folder
    with pytest.raises(KeyboardInterrupt):
        run_eval(setup, other, generate=CountingGenerate(crash_at=3))
    folder = other.parent / "eval" / "samples_5_beta_3"
    assert len(list(folder.glob("shard_*.npy"))) == 2 and records(other.parent) == {}
    gen = CountingGenerate()
    resumed = run_eval(setup, other, generate=gen)
    assert gen.calls == 2 and gen.seeds == [3 * ev.SEED_STRIDE + 2, 3 * ev.SEED_STRIDE + 3]
    assert {k: resumed[k] for k in ("fid", "is_mean", "is_std")} == {k: reference[k] for k in ("fid", "is_mean", "is_std")}
    again = CountingGenerate()
    run_eval(setup, other, generate=again)
    assert again.calls == 0
    (folder / "shard_00003.npy").write_bytes(b"truncated")  # a damaged shard is sampled again
    run_eval(setup, other, generate=again)
    assert again.calls == 1


def test_fewer_samples_are_a_prefix_of_more(setup: dict) -> None:
    """Every shard holds a full batch, so --num-samples 14 evaluates the first 14 of --num-samples 20's images."""
    run_eval(setup, num_samples=14)
    folder = setup["ckpt"].parent / "eval" / "samples_5_beta_3"
    assert len(list(folder.glob("shard_*.npy"))) == 4  # 16 images, the last 2 unused for now
    gen = CountingGenerate()
    assert run_eval(setup, num_samples=20, generate=gen)["num_samples"] == 20
    assert gen.calls == 1  # only shard 4 is new
    ext = TinyExtractor()
    ev.evaluate(setup["ckpt"], num_samples=14, steps=5, batch_size=4, seed=3, ref=setup["ref"], device="cpu",
                progress=False, stats_cache=setup["cache"], extractor=ext,
                generate=lambda *a, **k: pytest.fail("all shards exist"))
    assert ext.seen == 14


def test_stale_shards_of_another_checkpoint_are_not_reused(setup: dict) -> None:
    first = run_eval(setup)
    make_checkpoint(setup["ckpt"], seed=1, step=200)  # training went on: new weights at the same path
    gen = CountingGenerate()
    second = run_eval(setup, generate=gen)
    assert gen.calls == 4 and second["checkpoint_step"] == 200 and second["fid"] != first["fid"]
    meta = json.loads((setup["ckpt"].parent / "eval" / "samples_5_beta_3" / "meta.json").read_text())
    assert meta["checkpoint_step"] == 200


def test_each_evaluation_keeps_a_record_of_its_own(setup: dict) -> None:
    """Evaluations that differ in any setting that changes the score write records of their own, named by the
    settings: none overwrites another's, as every evaluation overwrote the one eval.json before."""
    first = run_eval(setup)
    results = [first, run_eval(setup, num_samples=12), run_eval(setup, steps=4), run_eval(setup, sampler="ddim"),
               run_eval(setup, clip=False), run_eval(setup, seed=4)]
    saved = records(setup["ckpt"].parent)
    assert saved == {ev.record_path(setup["ckpt"].parent, r).name: r for r in results} and len(saved) == 6
    assert saved[ev.record_path(setup["ckpt"].parent, first).name] == first
    # the default reference adds nothing to the name; the record's name is its shard folder's, then the score's
    default = {**first, "ref": "data/cifar10/train.npy"}
    assert ev.record_path("runs/x", default) == Path("runs/x/eval/samples_5_beta_3_n16_inception.json")


def with_sample(path: Path, **keys) -> Path:
    """Set sample.* and eval.* keys (flat: clip=..., num_samples=...) in a checkpoint's config."""
    state = load_checkpoint(path)
    for k, v in keys.items():
        state["config"]["eval" if k == "num_samples" else "sample"][k] = v
    save_checkpoint(path, state)
    return path


@pytest.fixture
def cifar_dir(tmp_path: Path, monkeypatch) -> Path:
    """A working folder with a small data/cifar10/train.npy (the default reference), the tiny extractor standing in
    for the FID Inception, and a checkpoint sampling 5 steps with 10 images of FID during training."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    np.save(tmp_path / "data" / "cifar10" / "train.npy", smooth_images(32, seed=5).numpy())
    monkeypatch.setattr(ev, "inception_extractor", lambda device: TinyExtractor())
    with_sample(make_checkpoint(tmp_path / "run" / "checkpoint.pt"), steps=5, num_samples=10)
    return tmp_path


@pytest.mark.parametrize("clip", [False, True])
def test_clipping_follows_the_checkpoint_as_fid_during_training_does(cifar_dir: Path, clip: bool) -> None:
    """One rule: evaluate.py clips x0 as the checkpoint's sample.clip says, as the training-time scorer does, so
    the same model, seed and number of samples give the same samples and the same FID in both."""
    ckpt = with_sample(cifar_dir / "run" / "checkpoint.pt", clip=clip)
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state)
    during_training = ev.training_scorer(config.from_dict(state["config"]), torch.device("cpu"),
                                         stats_cache=cifar_dir / "stats", progress=False)(model, 0)
    gen = CountingGenerate()
    result = ev.evaluate(ckpt, num_samples=10, steps=5, batch_size=10, seed=0, variance="auto", device="cpu",
                         progress=False, stats_cache=cifar_dir / "stats", generate=gen)
    assert gen.clips == [clip] and result["clip"] is clip and ("x0 not clipped" in result["note"]) is not clip
    assert result["fid"] == during_training["fid"] and result["is_mean"] == during_training["is_mean"]
    folder = cifar_dir / "run" / "eval" / ("samples_5_posterior_0" + "_noclip" * (not clip))
    assert json.loads((folder / "meta.json").read_text())["clip"] is clip
    # clipping changes this model's samples: the equal FIDs above are not a coincidence of the two settings
    schedule = sample.schedule_from_config(state["config"])
    unclipped, clipped = (sample.generate(model, schedule, 4, steps=5, variance="auto", clip=c) for c in (False, True))
    assert not torch.equal(unclipped, clipped)


def test_cli_clip_flags_override_the_checkpoint(cifar_dir: Path, capsys) -> None:
    ckpt = with_sample(cifar_dir / "run" / "checkpoint.pt", clip=False)
    base = ["--checkpoint", str(ckpt), "--num-samples", "10", "--steps", "5", "--batch-size", "10", "--device", "cpu",
            "--stats-cache", str(cifar_dir / "stats")]
    for flags, clip in (([], False), (["--clip"], True), (["--no-clip"], False)):
        ev.main([*base, *flags])
        path = ckpt.parent / "eval" / f"samples_5_posterior_0{'_noclip' * (not clip)}_n10_inception.json"
        assert json.loads(path.read_text())["clip"] is clip, flags
        assert capsys.readouterr().out.rstrip().endswith(f"-> {path}")


def test_the_metric_dvc_reads_is_the_stages_own_result_and_git_tracks_the_records(cifar_dir: Path, capsys) -> None:
    """eval/dvc.yaml declares <out_dir>/eval.json, a metric with cache: false (tracked by git, not ignored), and its
    command writes exactly that file with --metrics; records are tracked, their shard folders ignored."""
    stage = yaml.safe_load((ROOT / "eval" / "dvc.yaml").read_text())["stages"]["evaluate"]
    metric = "${out_dir}/eval.json"
    assert stage["metrics"] == [{metric: {"cache": False}}]
    assert stage["cmd"].split()[-2:] == ["--metrics", metric]
    ckpt = cifar_dir / "run" / "checkpoint.pt"
    ev.main(["--checkpoint", str(ckpt), "--num-samples", "10", "--steps", "5", "--batch-size", "10", "--device",
             "cpu", "--stats-cache", str(cifar_dir / "stats"), "--metrics", str(ckpt.parent / "eval.json")])
    (name, record), = records(ckpt.parent).items()
    (shards,) = [p.name for p in (ckpt.parent / "eval").iterdir() if p.is_dir()]
    assert json.loads((ckpt.parent / "eval.json").read_text()) == record
    assert capsys.readouterr().out.rstrip().endswith(f" and {ckpt.parent / 'eval.json'}")
    out_dir = yaml.safe_load((ROOT / "config.yaml").read_text())["out_dir"]
    paths = [metric.replace("${out_dir}", out_dir), f"{out_dir}/eval/{name}",
             f"{out_dir}/eval/{shards}/shard_00000.npy"]
    git = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert git.returncode in (0, 1), git.stderr
    assert git.stdout.split() == paths[2:]  # only the shards are ignored


class MeanColourExtractor:
    """A cheap stand-in for Inception: the mean of each colour channel (3 features) and 10 logits made from them."""
    name = "mean-colour"
    weights = torch.linspace(-4, 4, 30, dtype=torch.float64).reshape(3, 10)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = images.double().mean(dim=(2, 3)) / 255.0
        return pool, pool @ self.weights


def test_the_papers_settings_are_comparable_with_the_paper(tmp_path: Path) -> None:
    """50,000 samples of 1000 steps with variance beta, of a CIFAR-10 checkpoint: eval.json says comparable (the
    samples here are random images from a stand-in sampler: only the settings are the paper's)."""
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoint.pt", num_timesteps=1000)
    ref = tmp_path / "ref.npz"
    np.savez(ref, smooth_images(32, seed=5).permute(0, 2, 3, 1).numpy())

    def random_images(model, schedule, n: int, **kwargs) -> torch.Tensor:
        assert kwargs["settings"].steps == 1000 and kwargs["settings"].variance == "beta"
        return noise_images(n, seed=kwargs["seed"])
    result = ev.evaluate(ckpt, num_samples=50_000, batch_size=25_000, ref=ref, device="cpu",
                         extractor=MeanColourExtractor(), progress=False, stats_cache=tmp_path / "stats",
                         generate=random_images)
    assert records(ckpt.parent) == {f"samples_1000_beta_0_n50000_inception_ref-{tmp_path.name}-ref.json": result}
    assert (result["num_samples"], result["steps"], result["variance"], result["dataset"]) == \
        (50_000, 1000, "beta", "cifar10")
    assert result["comparable_with_paper"] is True and result["note"].startswith("comparable with the paper")


def test_resume_with_another_batch_size_is_refused(setup: dict) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_eval(setup, generate=CountingGenerate(crash_at=2))
    with pytest.raises(ev.EvalError, match="--batch-size 4"):
        run_eval(setup, batch_size=8)


def test_reference_stats_are_cached_per_extractor(setup: dict) -> None:
    ext = TinyExtractor()
    run_eval(setup, extractor=ext)
    assert ext.seen == 32 + 16  # the reference, then the samples
    files = list(setup["cache"].glob("*.npz"))
    assert len(files) == 1 and "tiny" in files[0].name
    ext2 = TinyExtractor()
    run_eval(setup, extractor=ext2)
    assert ext2.seen == 16  # the reference statistics came from the cache
    run_eval(setup, extractor=TinyExtractor(name="tiny-b", seed=1))
    assert len(list(setup["cache"].glob("*.npz"))) == 2  # another extractor, another cache file


def test_reference_formats_agree(setup: dict, tmp_path: Path) -> None:
    """An .npz of images, a folder of PNGs, a .npy dataset and an .npz of statistics give the same statistics."""
    from PIL import Image
    ext = TinyExtractor()
    images = smooth_images(32, seed=5)
    mu, sigma = ev.reference_stats(setup["ref"], ext, cache_dir=tmp_path / "c")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(pngs / f"{i:03d}.png")
    npy = tmp_path / "set" / "train.npy"
    npy.parent.mkdir()
    np.save(npy, images.numpy())
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=mu, sigma=sigma)
    for ref in (pngs, npy, stats):
        mu2, sigma2 = ev.reference_stats(ref, ext, cache_dir=tmp_path / "c")
        assert np.allclose(mu, mu2) and np.allclose(sigma, sigma2)
    with pytest.raises(ev.EvalError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", x=np.zeros(3))
        ev.reference_stats(tmp_path / "bad.npz", ext, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- the command line

def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_bad_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = cli(["--checkpoint", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and "corrupt or unreadable checkpoint" in one_error_line(err)


def test_cli_missing_inception_weights(setup: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    fe = require("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache: torch.hub.get_dir() follows
    name = fe.URL_INCEPTION_V3.rsplit("/", 1)[-1]
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / name
    code, _, err = cli(["--checkpoint", str(setup["ckpt"]), "--ref", str(setup["ref"]), "--device", "cpu",
                        "--num-samples", "16", "--steps", "5"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert name in line and fe.URL_INCEPTION_V3 in line and str(expected) in line
    assert not (setup["ckpt"].parent / "eval").exists()  # failed before sampling
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"a truncated download")
    code, _, err = cli(["--checkpoint", str(setup["ckpt"]), "--ref", str(setup["ref"]), "--device", "cpu"], capsys)
    assert code == 2 and "cannot load the Inception weights" in one_error_line(err)


@pytest.mark.slow
def test_inception_extractor_with_stand_in_weights(tmp_path: Path, monkeypatch) -> None:
    """The real extractor's plumbing (weight file found in torch hub's cache, features and logits, name) with
    untrained weights of the right shapes standing in for the real file, which this machine cannot download."""
    fe = require("torch_fidelity.feature_extractor_inceptionv3")

    class Untrained(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    torch.save({}, tmp_path / "empty.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = Path(torch.hub.get_dir()) / "checkpoints" / fe.URL_INCEPTION_V3.rsplit("/", 1)[-1]
    weights.parent.mkdir(parents=True)
    torch.save(Untrained("x", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pt")).state_dict(),
               weights)
    ext = ev.inception_extractor("cpu")
    pool, logits = ev.extract_features(smooth_images(2, seed=0, channels=1), ext)
    assert ext.name == ev.INCEPTION and pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.dtype == np.float64 and np.isfinite(pool).all() and np.isfinite(logits).all()


def test_cli_missing_package(setup: dict, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # `import torch_fidelity` raises ImportError
    code, _, err = cli(["--checkpoint", str(setup["ckpt"]), "--ref", str(setup["ref"]), "--device", "cpu"], capsys)
    assert code == 2 and "pip install -r requirements-eval.txt" in one_error_line(err)


def test_cli_missing_training_set(setup: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no data/cifar10/train.npy here
    code, _, err = cli(["--checkpoint", str(setup["ckpt"]), "--device", "cpu"], capsys)
    line = one_error_line(err)
    assert code == 2 and "data/cifar10/train.npy" in line and "data.py" in line


def test_summary_is_one_labelled_line(setup: dict) -> None:
    result = run_eval(setup)
    line = ev.summary(result, "run/eval.json")
    assert "\n" not in line and line.startswith("FID ") and "NOT comparable" in line and "16 samples, 5 steps" in line
    names = {s: ev.summary({**result, "sampler": s}, "run/eval.json") for s in ("dpm++2m", "dpm++2m-sde")}
    assert "DPM-Solver++(2M)" in names["dpm++2m"] and "SDE-" not in names["dpm++2m"]
    assert "SDE-DPM-Solver++(2M)" in names["dpm++2m-sde"]  # the summary names the sampler that made the samples
