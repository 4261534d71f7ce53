"""The weight bridge to diffusers (export.from_diffusers / to_diffusers, export.py, sample.py and evaluate.py
--diffusers): our UNet computes what diffusers' UNet2DModel computes in the layout of the paper's released model
(google/ddpm-cifar10-32), built here with random weights (no network); the mappings are exact inverses; an exported
run loads as a DDPMPipeline whose denoising step and sampler equal ours; a checkpoint written before the layout was
recorded still computes what the old code computed, and resumes in it."""
from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import require

require("diffusers")  # requirements-bench.txt: skips the module without it, but under CI fails (tests/conftest.py)
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import checkpoint  # noqa: E402
import config  # noqa: E402
import ddpm  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402
from helpers import link_datasets, one_error_line, run_cli, tiny_config, write_synthetic_cifar  # noqa: E402
from export import diffusers_config, from_diffusers, model_args_from_diffusers, to_diffusers  # noqa: E402
from unet import UNet  # noqa: E402

# google/ddpm-cifar10-32's config.json (the settings that differ from UNet2DModel's defaults).
CIFAR10_32 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=[128, 256, 256, 256],
                  down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], downsample_padding=0,
                  norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, attention_head_dim=None)
# A 1-channel miniature of it: two levels, attention at 8x8.
TINY_1CH = {**CIFAR10_32, "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
            "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
TINY = dict(channels=32, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0, image_size=16)
PAPER_PARAMS = 35_746_307
DEFAULTS = {k: list(p.default) if isinstance(p.default, tuple) else p.default
            for k, p in inspect.signature(UNet).parameters.items()}


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (no zero-initialised output layer, no unit GroupNorm scale hides a mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def their_model(cfg: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with diffusers' initialisation plus noise: outputs of order 1 and no parameter left at 0 or 1."""
    model = UNet2DModel(**cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def inputs(model, batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=gen)
    return x, torch.tensor([0, 1, 500, 999][:batch])


def ours_from(theirs: UNet2DModel) -> UNet:
    ours = UNet(**model_args_from_diffusers(theirs.config)).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict()), strict=True)
    return ours


def numel(state_dict: dict) -> int:
    return sum(v.numel() for v in state_dict.values())


# ---------------------------------------------------------------- the same function

def test_the_default_unet_computes_what_the_released_models_layout_computes() -> None:
    theirs = their_model(CIFAR10_32)
    ours = UNet().eval()  # the defaults ARE the paper's network: no argument needed
    mapped = from_diffusers(theirs.state_dict())
    ours.load_state_dict(mapped, strict=True)
    assert numel(mapped) == numel(theirs.state_dict()) == numel(ours.state_dict()) == PAPER_PARAMS  # none invented
    x, t = inputs(ours)
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert b.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The config maps to our defaults (but for dropout, which diffusers' config leaves at 0: eval mode ignores it).
    assert model_args_from_diffusers(theirs.config) == {**DEFAULTS, "out_channels": 3, "dropout": 0.0}


# Structures our config can build: levels, blocks, attention anywhere or nowhere, 1 or 3 channels, both layouts.
STRUCTURES = [
    TINY,
    {**TINY, "in_channels": 1},
    {**TINY, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16, 4]},
    {**TINY, "channel_mult": [1, 1, 3], "num_res_blocks": 3, "attn_resolutions": []},
    {**TINY, "channel_mult": [1], "attn_resolutions": [16]},
    {**TINY, "out_channels": 2, "norm_eps": 1e-5, "downsample_padding": "symmetric"},  # the legacy layout
    {**TINY, "norm_groups": 8},  # model.norm_groups: diffusers' norm_num_groups
]


@pytest.mark.parametrize("args", STRUCTURES, ids=range(len(STRUCTURES)))
def test_every_structure_maps_both_ways_and_computes_the_same(args: dict) -> None:
    ours = randomize(UNet(**args), seed=3)
    theirs = UNet2DModel(**diffusers_config(args)).eval()
    sd = to_diffusers(ours.state_dict())
    theirs.load_state_dict(sd, strict=True)
    assert numel(sd) == numel(ours.state_dict())
    expected = {**DEFAULTS, **args}
    expected["out_channels"] = expected["out_channels"] or expected["in_channels"]
    assert model_args_from_diffusers(theirs.config) == expected
    x, t = inputs(ours)
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_one_channel_diffusers_model_maps_to_ours() -> None:
    theirs = their_model(TINY_1CH)
    ours = ours_from(theirs)
    assert (ours.in_channels, ours.image_size) == (1, 16)
    x, t = inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_every_group_norm_has_the_models_eps(eps: float) -> None:
    """As diffusers applies norm_eps to every GroupNorm (residual, attention, output). Numerically an eps that one
    kind of layer forgot moves the output by less than the 1e-5 tolerance above, so it is checked here directly."""
    model = UNet(**{**TINY, "norm_eps": eps})
    theirs = UNet2DModel(**diffusers_config({**TINY, "norm_eps": eps}))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in theirs.modules())
    assert {m.eps for m in norms} == {m.eps for m in theirs.modules() if isinstance(m, torch.nn.GroupNorm)} == {eps}


@pytest.mark.parametrize("groups", [8, 32])
def test_every_group_norm_has_the_models_groups(groups: int) -> None:
    """As diffusers applies norm_num_groups to every GroupNorm (residual, attention, output)."""
    model = UNet(**{**TINY, "norm_groups": groups})
    theirs = UNet2DModel(**diffusers_config({**TINY, "norm_groups": groups}))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in theirs.modules())
    assert {m.num_groups for m in norms} == {groups}
    assert {m.num_groups for m in theirs.modules() if isinstance(m, torch.nn.GroupNorm)} == {groups}


@pytest.mark.parametrize("change, message", [({"norm_eps": 0.0}, "norm_eps must be > 0"),
                                             ({"downsample_padding": "same"}, "downsample_padding must be one of"),
                                             ({"norm_groups": 0}, "norm_groups must be >= 1"),
                                             ({"norm_groups": 12}, "channels must be a positive multiple of 12")])
def test_bad_layout_arguments_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **change})


def test_the_layout_matters_so_the_legacy_variant_differs() -> None:
    """Why the defaults changed: with TF's padding and eps 1e-6 replaced by the old ones, the same weights compute
    something else (the padding moves outputs by O(1); eps alone by ~1e-5)."""
    theirs = their_model(TINY_1CH)
    args = model_args_from_diffusers(theirs.config)
    x, t = inputs(UNet(**args))
    with torch.no_grad():
        b = theirs(x, t).sample
        for change, at_least in [(unet.LEGACY_ARGS, 1e-2), ({"downsample_padding": "symmetric"}, 1e-2),
                                 ({"norm_eps": 1e-5}, 1e-6)]:
            model = UNet(**{**args, **change}).eval()
            model.load_state_dict(from_diffusers(theirs.state_dict()))
            assert (model(x, t) - b).abs().max() > at_least, change


# ---------------------------------------------------------------- exact inverses

@pytest.mark.parametrize("cfg", [CIFAR10_32, TINY_1CH], ids=["cifar10-32", "tiny-1ch"])
def test_round_trips_are_bitwise_identities(cfg: dict) -> None:
    theirs = their_model(cfg).state_dict()
    back = to_diffusers(from_diffusers(theirs))
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    ours = randomize(UNet(**model_args_from_diffusers(UNet2DModel(**cfg).config)), seed=5).state_dict()
    again = from_diffusers(to_diffusers(ours))
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], ours[k]) and again[k].dtype == ours[k].dtype for k in ours)


def test_the_mapping_lives_in_export_and_unet_keeps_its_public_names() -> None:
    """The bridge's one home is export.py; `unet.from_diffusers` / `unet.to_diffusers` (public since the bridge
    was written) are the same functions, and unet.py itself holds none of diffusers' naming."""
    assert unet.from_diffusers is export.from_diffusers and unet.to_diffusers is export.to_diffusers
    assert "down_blocks" not in Path(unet.__file__).read_text()
    with pytest.raises(AttributeError, match="no attribute 'from_pretrained'"):
        unet.from_pretrained


# ---------------------------------------------------------------- what does not fit, named

def renamed(sd: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in sd.items()}


@pytest.mark.parametrize("edit, named", [
    (lambda sd: renamed(sd, "down_blocks.1.attentions.0.to_q.weight", "down_blocks.1.attentions.0.query.weight"),
     "down_blocks.1.attentions.0.query.weight"),  # diffusers' old attention names: another layout
    (lambda sd: renamed(sd, "mid_block.resnets.1.norm2.bias", "mid_block.resnets.2.norm2.bias"),
     "mid_block.resnets.2.norm2.bias"),
    (lambda sd: {**sd, "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 5, 5)},
     "down_blocks.0.resnets.0.conv1.weight"),  # another size
    (lambda sd: {**sd, "up_blocks.0.attentions.1.to_v.weight": torch.zeros(64, 32)},
     "up_blocks.0.attentions.1.to_v.weight"),
    (lambda sd: {**sd, "mid_block.attentions.0.to_out.0.weight": torch.zeros(64, 64, 1, 1)},
     "mid_block.attentions.0.to_out.0.weight"),  # a 1x1 conv where diffusers has a Linear layer
    (lambda sd: {k: v for k, v in sd.items() if k != "up_blocks.1.resnets.1.conv_shortcut.bias"},
     "up_blocks.1.resnets.1.conv_shortcut.bias"),  # missing
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("mid_block.attentions")},
     "mid_block.attentions.0.group_norm.weight"),  # add_attention=False: not this network
])
def test_from_diffusers_names_the_first_key_that_does_not_fit(edit, named: str) -> None:
    sd = their_model(TINY_1CH).state_dict()
    with pytest.raises(ValueError, match=rf"^{named.replace('.', '[.]')}: "):
        from_diffusers(edit(sd))


def test_to_diffusers_names_the_first_key_that_does_not_fit() -> None:
    sd = UNet(**TINY).state_dict()
    with pytest.raises(ValueError, match=r"^down\.0\.0\.extra\.weight: not a parameter"):
        to_diffusers({**sd, "down.0.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"^down\.0\.0\.temb_proj\.weight: shape \(32, 7\)"):
        to_diffusers({**sd, "down.0.0.temb_proj.weight": torch.zeros(32, 7)})
    with pytest.raises(ValueError, match=r"^mid\.1\.qkv\.bias: missing"):
        to_diffusers({k: v for k, v in sd.items() if k != "mid.1.qkv.bias"})


@pytest.mark.parametrize("change, named", [
    ({"attention_head_dim": 8}, "attention_head_dim=8 makes several heads"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos=True"),
    ({"freq_shift": 0}, "freq_shift=0"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"add_attention": False}, "add_attention=False"),
    ({"num_class_embeds": 10}, "num_class_embeds=10"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "are not the DDPM UNet's"),
    ({"block_out_channels": [64, 96]}, "not multiples of the first"),
    ({"attn_norm_num_groups": 16}, "attn_norm_num_groups=16"),
])
def test_model_args_from_diffusers_refuses_what_this_unet_cannot_compute(change: dict, named: str) -> None:
    cfg = dict(UNet2DModel(**{**TINY_1CH, **change}).config)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("(", r"\(")):
        model_args_from_diffusers(cfg)


def test_model_args_from_diffusers_accepts_one_head_named_explicitly_and_refuses_unknown_settings() -> None:
    cfg = dict(UNet2DModel(**{**TINY_1CH, "attention_head_dim": 64}).config)  # 64 channels at 8x8 and in the middle
    assert model_args_from_diffusers(cfg)["attn_resolutions"] == [8]
    with pytest.raises(ValueError, match="'new_option' is unknown"):
        model_args_from_diffusers({**cfg, "new_option": 1})
    with pytest.raises(ValueError, match="'norm_eps' is missing"):
        model_args_from_diffusers({k: v for k, v in cfg.items() if k != "norm_eps"})
    with pytest.raises(ValueError, match=r"channel_mult\[0\] = 1"):
        diffusers_config({**TINY, "channel_mult": [2, 2]})


# ---------------------------------------------------------------- export.py

def write_checkpoint(path: Path, model_args: dict, *, legacy: bool = False, **settings) -> dict:
    """A checkpoint as train.py writes it (EMA and raw weights differ), with the paper's layout recorded; `legacy`:
    its model_args lack the layout keys, as every checkpoint written before they were recorded."""
    recorded = model_args if legacy else {**model_args, "norm_eps": 1e-6, "downsample_padding": "tf_same"}
    built = {**unet.LEGACY_ARGS, **recorded}
    state = {"model": randomize(UNet(**built), seed=10).state_dict(), "ema": randomize(UNet(**built), 11).state_dict(),
             "optimizer": {}, "step": 7, "epoch": 1, "config": config.to_dict(tiny_config(**settings)),
             "model_args": recorded}
    checkpoint.save_checkpoint(path, state)
    return checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["paper-layout", "legacy-layout"])
def test_an_export_loads_as_a_ddpm_pipeline_whose_step_equals_ours(tmp_path: Path, legacy: bool) -> None:
    """The legacy layout (symmetric padding, eps 1e-5) is diffusers' downsample_padding=1, norm_eps=1e-5: exact.
    DDPMScheduler keeps ᾱ_t in float32, so 1 - ᾱ_t near t = 0 carries a relative error of ~1e-4 (measured: its step
    differs from ours by up to ~2e-5 there); with ᾱ_t in float64, as our schedule (and the paper's code) computes
    it, its step is ours to 1e-5 at every t."""
    state = write_checkpoint(tmp_path / "c.pt", TINY, legacy=legacy, **{"diffusion.num_timesteps": 50})
    export.export(state, tmp_path / "my-ddpm")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "my-ddpm")
    assert (pipe.unet.config.downsample_padding, pipe.unet.config.norm_eps) == ((1, 1e-5) if legacy else (0, 1e-6))
    exact = DDPMScheduler.from_config(pipe.scheduler.config)
    exact.alphas_cumprod = torch.cumprod(1 - exact.betas.double(), 0)
    ours = checkpoint.model_from_checkpoint(state)  # EMA weights
    schedule = sample.schedule_from_config(state["config"])
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    for t in (49, 20, 1, 0):
        tt = torch.full((2,), t)
        x = ddpm.q_sample(schedule, x0, tt, torch.randn(x0.shape, generator=gen))
        with torch.no_grad():
            eps, theirs_eps = ours(x, tt), pipe.unet(x, t).sample
        torch.testing.assert_close(eps, theirs_eps, rtol=0, atol=1e-5)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))  # what step() draws at t > 0
        mine = ddpm.p_sample_step(schedule, eps, x, tt, noise)
        for scheduler, atol in [(exact, 1e-5), (pipe.scheduler, 1e-4)]:
            theirs = scheduler.step(theirs_eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            torch.testing.assert_close(mine, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize("kind, variance", [("linear", "beta"), ("cosine", "posterior")])
def test_the_exported_scheduler_round_trips_t_and_the_betas(tmp_path: Path, kind: str, variance: str) -> None:
    settings = {"diffusion.num_timesteps": 300, "diffusion.schedule": kind, "diffusion.beta_start": 2e-4,
                "diffusion.beta_end": 0.03, "sample.variance": variance}
    state = write_checkpoint(tmp_path / "c.pt", TINY, **settings)
    export.export(state, tmp_path / "out")
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    ours = sample.schedule_from_config(state["config"])
    assert scheduler.config.num_train_timesteps == 300
    assert scheduler.config.variance_type == {"beta": "fixed_large", "posterior": "fixed_small"}[variance]
    torch.testing.assert_close(scheduler.betas, ours.betas, rtol=1e-6, atol=1e-9)  # diffusers: float32 arithmetic
    back = export.schedule_from_scheduler(scheduler.config)  # and back: the same float64 computation as ours
    assert torch.equal(back.betas, ours.betas) and torch.equal(back.alphas_cumprod, ours.alphas_cumprod)


def test_export_writes_ema_weights_by_default_and_raw_on_request(tmp_path: Path, capsys) -> None:
    state = write_checkpoint(tmp_path / "c.pt", TINY)
    for flags, key in [([], "ema"), (["--raw"], "model")]:
        out = tmp_path / f"out-{key}"
        export.main(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(out), *flags])
        assert f"wrote {out}" in capsys.readouterr().out
        got = from_diffusers(UNet2DModel.from_pretrained(out / "unet").state_dict())
        assert all(torch.equal(got[k], state[key][k]) for k in state[key])


def run_main(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


def test_export_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    write_checkpoint(tmp_path / "c.pt", TINY)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], "checkpoint not found"),
             (["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "full")], "is not an empty folder")]
    for argv, message in cases:
        assert message in run_main(export.main, argv, capsys)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    write_checkpoint(tmp_path / "wide.pt", {**TINY, "channel_mult": [2, 2]})
    assert "channel_mult[0] = 1" in run_main(export.main, ["--checkpoint", str(tmp_path / "wide.pt"), "--out",
                                                          str(tmp_path / "w")], capsys)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    line = run_main(export.main, ["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o")], capsys)
    assert line == "error: diffusers is not installed: pip install -r requirements-bench.txt"
    assert not list(tmp_path.glob(".o.*")) and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- sampling diffusers' weights with our sampler

@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory) -> dict[str, tuple[Path, DDPMPipeline]]:
    """A random 1-channel UNet2DModel with a T = 20 DDPMScheduler, σ² = β and σ² = β̃, saved as pipelines."""
    root, out = tmp_path_factory.mktemp("pipelines"), {}
    for variance, variance_type in [("beta", "fixed_large"), ("posterior", "fixed_small")]:
        scheduler = DDPMScheduler(num_train_timesteps=20, beta_start=1e-3, beta_end=0.2, variance_type=variance_type)
        pipe = DDPMPipeline(unet=their_model(TINY_1CH), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / variance)
        out[variance] = (root / variance, pipe)
    return out


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_our_sampler_with_diffusers_weights_equals_the_ddpm_pipeline(pipeline_folders, variance: str) -> None:
    """Same generator seed: both draw x_T, then one noise tensor per step (but the last), from it."""
    folder, pipe = pipeline_folders[variance]
    model, schedule = export.load_diffusers(str(folder))
    assert schedule.num_timesteps == 20
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                  output_type="pt").images
    ours = ddpm.sample(schedule, model, (3, 1, 16, 16), variance=variance, generator=torch.Generator().manual_seed(0))
    assert theirs.std() > 0.1
    torch.testing.assert_close(ddpm.to_unit(ours), theirs, rtol=0, atol=1e-5)


def test_load_diffusers_reads_a_bare_unet_folder_with_the_papers_schedule(tmp_path: Path) -> None:
    theirs = their_model(TINY_1CH)
    theirs.save_pretrained(tmp_path / "unet-only")
    model, schedule = export.load_diffusers(str(tmp_path / "unet-only"))
    assert torch.equal(schedule.betas, ddpm.make_schedule().betas)  # no scheduler: T = 1000, β 1e-4 .. 0.02
    x, t = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), theirs(x, t).sample, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="only linear and squaredcos_cap_v2"):
        export.schedule_from_scheduler({"beta_schedule": "scaled_linear"})
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        export.schedule_from_scheduler({"beta_schedule": "linear", "prediction_type": "v_prediction"})


def test_sample_cli_samples_a_diffusers_folder(pipeline_folders, tmp_path: Path, monkeypatch, capsys) -> None:
    folder, pipe = pipeline_folders["beta"]
    monkeypatch.chdir(tmp_path)
    sample.main(["--diffusers", str(folder), "--num-images", "3", "--device", "cpu", "--npz", "s.npz",
                 "--out", "s.png"])
    assert f"wrote 3 images (diffusers {folder}) to s.png" in capsys.readouterr().out
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                  output_type="pt").images  # sample.py's first batch uses seed 0
    got = torch.from_numpy(np.load(tmp_path / "s.npz")["arr_0"]).permute(0, 3, 1, 2)
    assert (got.int() - ddpm.to_uint8(theirs * 2 - 1).int()).abs().max() <= 1  # uint8 rounding at most


def test_cli_errors_for_diffusers_sources_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert "cannot load a diffusers UNet2DModel" in run_main(sample.main, ["--diffusers", str(tmp_path / "empty")],
                                                            capsys)
    for path in (str(tmp_path / "nope"), "./nope", "nope/"):  # a path that is not there: never asks the hub
        assert run_main(sample.main, ["--diffusers", path], capsys) == f"error: {path}: no such folder"
    assert "--raw chooses" in run_main(sample.main, ["--diffusers", str(tmp_path), "--raw"], capsys)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert run_main(sample.main, ["--diffusers", str(tmp_path)], capsys) == \
        "error: diffusers is not installed: pip install -r requirements-bench.txt"


def test_a_hub_id_tries_a_pipelines_unet_folder_only_when_the_hub_says_the_flat_one_is_missing(
        pipeline_folders, monkeypatch) -> None:
    """No network here: from_pretrained is replaced by one that answers as the hub would, from a local pipeline."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    folder, _ = pipeline_folders["beta"]
    real, calls = UNet2DModel.from_pretrained.__func__, []

    def fake(cls, source, subfolder=None, **kwargs):
        calls.append(subfolder)
        if subfolder is None:
            try:
                raise answer
            except type(answer) as cause:
                raise OSError(f"{source} does not appear to have a file named config.json.") from cause
        return real(cls, folder, subfolder=subfolder, **kwargs)
    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(fake))
    real_config = DDPMScheduler.load_config.__func__
    monkeypatch.setattr(DDPMScheduler, "load_config", classmethod(
        lambda cls, source, subfolder=None, **kw: real_config(cls, folder, subfolder=subfolder, **kw)))
    answer = EntryNotFoundError("404 Client Error: Entry Not Found for url: .../config.json")
    model, schedule = export.load_diffusers("someone/a-ddpm-pipeline")
    assert calls == [None, "unet"] and model.in_channels == 1 and schedule.num_timesteps == 20  # scheduler/ too
    calls.clear()
    answer = LocalEntryNotFoundError("cannot reach the hub, and the file is not in the cache")
    with pytest.raises(ValueError, match="the hub cannot be reached"):
        export.load_diffusers("someone/a-ddpm-pipeline")
    assert calls == [None]  # no second wait for a hub that did not answer


CHATTY_OFFLINE = """
import logging, sys, warnings
sys.path.insert(0, {root!r})
from diffusers import UNet2DModel
import sample

real = UNet2DModel.from_pretrained.__func__

def chatty(cls, source, **kwargs):  # what from_pretrained says with no network (without its 30 s of retries)
    logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown while "
                                                              "requesting HEAD ... Retrying in 1s [Retry 1/5].")
    logging.getLogger("diffusers.models.modeling_utils").warning("Cannot initialize model with low cpu memory usage")
    warnings.warn("The `local_dir_use_symlinks` argument is deprecated", UserWarning)
    return real(cls, source, **kwargs)  # HF_HUB_OFFLINE=1: fails at once, as it does after the retries
UNet2DModel.from_pretrained = classmethod(chatty)
sample.main(["--diffusers", "google/ddpm-cifar10-32"])
"""


def test_a_hub_id_without_the_network_is_one_line_without_the_hubs_chatter(tmp_path: Path, monkeypatch) -> None:
    """Without the network huggingface_hub logs every retry and diffusers warns: none of it may reach the terminal
    around the one error line, which says what went wrong (diffusers' own says a file is missing)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "chatty.py").write_text(CHATTY_OFFLINE.format(root=str(Path(sample.__file__).parent)))
    result = run_cli(str(tmp_path / "chatty.py"), cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == "error: google/ddpm-cifar10-32: cannot load a diffusers UNet2DModel: " \
        "not a local folder, and the hub cannot be reached (a hub id needs the network)"


class ChannelStats:
    """A tiny deterministic stand-in for Inception: per-channel means and spreads, and two logits."""
    name = "channel-stats"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.double() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, :8].mean((2, 3))], 1)
        return pool, torch.stack([pool.sum(1), -pool.sum(1)], 1)


def test_evaluate_a_diffusers_folder(pipeline_folders, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    folder, _ = pipeline_folders["beta"]
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (20, 16, 16, 1), dtype=np.uint8))
    assert "pass --ref" in run_main(evaluate.main, ["--diffusers", str(folder)], capsys)
    result = evaluate.evaluate(None, diffusers=str(folder), num_samples=10, batch_size=5, ref=ref, device="cpu",
                               extractor=ChannelStats(), progress=False, stats_cache=tmp_path / "stats")
    saved = json.loads(evaluate.record_path(folder, result).read_text())
    assert saved == result and result["weights"] == f"diffusers {folder}" and result["checkpoint_step"] is None
    assert np.isfinite(result["fid"]) and len(list((folder / "eval" / "samples_20_beta_0").glob("shard_*"))) == 2
    assert evaluate.results_dir(None, "google/ddpm-cifar10-32") == Path("runs/diffusers/google--ddpm-cifar10-32")


# ---------------------------------------------------------------- checkpoints written before the layout was recorded

# UNet(**TINY) at commit 75422b4 (before norm_eps and downsample_padding existed), weights from `randomize(seed=1)`,
# on torch.randn(2, 3, 16, 16) of generator seed 2 at t = (3, 700): out.flatten()[::191] and out.abs().mean().
OLD_CODE_OUTPUT = [0.042246073484420776, 0.4840751886367798, -0.24103234708309174, 1.0550384521484375,
                   0.24339659512043, 0.29556238651275635, -0.7085580825805664, 0.35911843180656433,
                   0.09084418416023254]
OLD_CODE_MEAN_ABS = 0.44417986273765564


def test_an_old_checkpoint_computes_what_the_old_code_computed(tmp_path: Path) -> None:
    old_args = dict(TINY, in_channels=3)  # no layout keys, as train.py wrote them
    model = randomize(UNet(**old_args, **unet.LEGACY_ARGS), seed=1)
    state = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "step": 1, "epoch": 1,
             "config": config.to_dict(tiny_config()), "model_args": old_args}
    checkpoint.save_checkpoint(tmp_path / "old.pt", state)
    loaded = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tmp_path / "old.pt"))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = loaded(x, torch.tensor([3, 700]))
    # atol 1e-6: eps 1e-5 -> 1e-6 alone moves these by ~5e-6, the padding by O(1).
    torch.testing.assert_close(out.flatten()[::191], torch.tensor(OLD_CODE_OUTPUT), rtol=0, atol=1e-6)
    assert out.abs().mean().item() == pytest.approx(OLD_CODE_MEAN_ABS, abs=1e-6)
    assert checkpoint.model_args(state) == {**old_args, **unet.LEGACY_ARGS}
    assert checkpoint.model_args({"model_args": {**old_args, "norm_eps": 1e-6, "downsample_padding": "tf_same"}}) \
        == {**old_args, "norm_eps": 1e-6, "downsample_padding": "tf_same"}  # recorded keys win


def test_an_old_checkpoint_resumes_in_its_layout_and_new_runs_record_theirs(tmp_path: Path, monkeypatch) -> None:
    """One epoch of training, then its checkpoint resumed for another three ways: with the layout keys removed (as
    written before they existed), with the legacy layout recorded, and with the paper's recorded. The first two
    continue bitwise alike; the third does not."""
    write_synthetic_cifar(tmp_path / "cifar10", n_train=16, n_test=8)
    first = tmp_path / "first"
    first.mkdir()
    link_datasets(first, {"cifar10": tmp_path / "cifar10"})
    monkeypatch.chdir(first)
    cfg = tiny_config(**{"train.epochs": 1})
    train.train(cfg, progress=False)
    state = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    assert {k: state["model_args"][k] for k in unet.LEGACY_ARGS} == {"norm_eps": 1e-6, "downsample_padding": "tf_same"}
    results = {}
    for name, layout in [("old", {}), ("legacy", unet.LEGACY_ARGS),
                         ("paper", {"norm_eps": 1e-6, "downsample_padding": "tf_same"})]:
        folder = tmp_path / name
        shutil.copytree(first, folder, symlinks=True)
        monkeypatch.chdir(folder)
        args = {k: v for k, v in state["model_args"].items() if k not in unet.LEGACY_ARGS}
        checkpoint.save_checkpoint(Path(cfg.out_dir) / "checkpoint.pt", {**state, "model_args": {**args, **layout}})
        train.train(tiny_config(**{"train.epochs": 2}), progress=False)
        results[name] = checkpoint.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")
    assert results["old"]["model_args"] == results["legacy"]["model_args"] == {**args, **unet.LEGACY_ARGS}
    for key in ("model", "ema"):
        assert all(torch.equal(results["old"][key][k], results["legacy"][key][k]) for k in results["old"][key])
    assert not all(torch.equal(results["old"]["ema"][k], results["paper"]["ema"][k]) for k in results["old"]["ema"])
