"""config.py: every bad setting, file or override is refused with exit status 2 and one line that names the key or
the file, before anything is written; YAML values (1e-4, lists, null, booleans) read as meant; to_dict/from_dict
round-trip; config.yaml equals the dataclass defaults, which are the DDPM paper's. Hypothesis feeds load_config
random YAML documents and overrides: the answer is a Config or a one-line ConfigError, never another exception."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

import config
import ddpm
import train
from helpers import ROOT, files_under, one_error_line, run_cli

# ---------------------------------------------------------------- every refusal: exit 2, one line, nothing written

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")

# (config file contents or None for no --config, overrides, what the message must name)
REFUSED = {
    "unknown-top-level-key": ("seed: 1\nbogus: 2\n", [], "bogus: unknown key"),
    "unknown-section-key": ("train:\n  lrr: 0.1\n", [], "train.lrr: unknown key"),
    "wrong-type": ("train:\n  batch_size: big\n", [], "train.batch_size"),
    "bool-is-not-an-int": (None, ["train.epochs=true"], "train.epochs"),
    "list-is-not-a-float": (None, ["train.lr=[0.1]"], "train.lr"),
    "string-is-not-a-list": (None, ["model.channel_mult=abc"], "model.channel_mult"),
    "lr-zero": (None, ["train.lr=0"], "train.lr"),
    "lr-negative": ("train:\n  lr: -2.0e-4\n", [], "train.lr"),
    "lr-nan": (None, ["train.lr=.nan"], "train.lr"),
    "lr-inf": (None, ["train.lr=1e999"], "train.lr"),
    "batch-size-zero": (None, ["train.batch_size=0"], "train.batch_size"),
    "ema-decay-one": (None, ["train.ema_decay=1"], "train.ema_decay"),
    "ema-decay-negative": (None, ["train.ema_decay=-0.5"], "train.ema_decay"),
    "lr-schedule-unknown": (None, ["train.lr_schedule=exponential"], "train.lr_schedule"),
    "min-lr-negative": (None, ["train.min_lr=-1e-5"], "train.min_lr"),
    "min-lr-above-lr": (None, ["train.lr_schedule=cosine", "train.min_lr=1e-3"], "train.min_lr"),
    "max-steps-zero": (None, ["train.max_steps=0"], "train.max_steps"),
    "ema-warmup-not-a-bool": (None, ["train.ema_warmup=sometimes"], "train.ema_warmup"),
    "ema-inv-gamma-zero": (None, ["train.ema_inv_gamma=0"], "train.ema_inv_gamma"),
    "ema-power-negative": (None, ["train.ema_power=-0.5"], "train.ema_power"),
    "loss-weighting-unknown": (None, ["train.loss_weighting=p2"], "train.loss_weighting"),
    "snr-gamma-zero": (None, ["train.snr_gamma=0"], "train.snr_gamma"),
    "norm-groups-zero": (None, ["model.norm_groups=0"], "model.norm_groups"),
    "norm-groups-not-dividing-channels": (None, ["model.norm_groups=12"],
                                          "model: channels must be a positive multiple of 12"),
    "missing-file": ("<missing>", [], "missing.yaml: config file not found"),
    "no-config-yaml-here": ("<default>", [], "config.yaml: config file not found"),
    "malformed-yaml": ("train: [1,\n", [], "c.yaml: malformed YAML"),
    "tab-indented-yaml": ("train:\n\tlr: 1\n", [], "c.yaml: malformed YAML"),
    "bad-yaml-tag": ("seed: !!int abc\n", [], "c.yaml: malformed YAML"),
    "impossible-date": ("wandb:\n  project: 2024-13-45\n", [], "c.yaml: malformed YAML"),
    "nul-character": ("seed: 1\x00\n", [], "c.yaml: malformed YAML"),
    "folder": ("<folder>", [], "conf.d: is a folder"),
    "undecodable-bytes": (b"seed: \xff\xfe\n", [], "c.yaml: not UTF-8"),
    "top-level-list": ("- 1\n- 2\n", [], "c.yaml: the top level must be a mapping"),
    "top-level-scalar": ("42\n", [], "c.yaml: the top level must be a mapping"),
    "section-not-a-mapping": ("train: 5\n", [], "train: expected a mapping"),
    "empty-section": ("model:\n", [], "model: expected a mapping"),
    "key-with-a-newline": ('"train\\nlr": 1\n', [], "train lr: unknown key"),
    "override-without-equals": (None, ["train.lr"], "override 'train.lr'"),
    "override-bad-key": (None, ["train..lr=1"], "override 'train..lr=1'"),
    "override-bad-yaml": (None, ["train.lr=[1,"], "train.lr: cannot parse"),
    "override-bad-tag": (None, ["seed=!!int x"], "seed: cannot parse"),
    "override-unknown-key": (None, ["train.bogus=1"], "train.bogus: unknown key"),
    "override-unknown-section": (None, ["bogus.lr=1"], "bogus: unknown section"),
    "override-into-a-scalar": (None, ["seed.x=1"], "seed: unknown section"),
    "override-into-a-non-mapping": ("train: 5\n", ["train.lr=1"], "train: expected a mapping"),
    "sample-steps-above-T": (None, ["diffusion.num_timesteps=10", "sample.steps=11"], "sample.steps"),
    "channels-48": (None, ["model.channels=48"], "model: channels must be a positive multiple of 32"),
    "attn-never-reached": (None, ["model.attn_resolutions=[7]"], "model: attn_resolutions [7]"),
    "too-many-levels": (None, ["model.channel_mult=[1, 1, 1, 1, 1, 1, 1]"], "model.channel_mult"),
    "out-dir-absolute": (None, ["out_dir=/tmp/somewhere"], "out_dir"),
    "out-dir-dotdot": (None, ["out_dir=runs/../../x"], "out_dir"),
    "device-typo": (None, ["device=gpu"], "device"),
    "cuda-without-gpu": pytest.param(None, ["device=cuda"], "device: 'cuda' but no CUDA device", marks=NO_CUDA),
    "fp16-on-cpu": (None, ["device=cpu", "train.precision=fp16"], "train.precision"),
    "fp16-auto-device-on-cpu": pytest.param(None, ["train.precision=fp16"], "train.precision", marks=NO_CUDA),
    "seed-2**63": (None, [f"seed={2**63}"], "seed"),
    "seed-negative": (None, ["seed=-1"], "seed"),
    "beta-start-above-end": (None, ["diffusion.beta_start=0.03"], "diffusion.beta_start"),
    "beta-start-above-end-cosine": (None, ["diffusion.schedule=cosine", "diffusion.beta_start=0.5",
                                           "diffusion.beta_end=0.1"], "diffusion.beta_start"),  # make_schedule's rule
    "beta-end-one": (None, ["diffusion.beta_end=1"], "diffusion.beta_end"),
    "unknown-dataset": (None, ["data.dataset=mnist"], "data.dataset"),
    "bad-md5": (None, ["data.md5=abc"], "data.md5"),
    "crop-negative": (None, ["data.crop=-1"], "data.crop"),
    "crop-everything": (None, ["data.crop=16"], "data.crop"),
    "crop-breaks-the-levels": (None, ["data.crop=2", "model.channel_mult=[1,2,2,2]"],  # 28 is not divisible by 8
                               "model: image_size 28 is not divisible by 2^(len(channel_mult) - 1) = 8 (data.crop 2)"),
}


def params(table: dict) -> list:
    """The table's rows as pytest params named by their keys (rows already made with pytest.param keep marks)."""
    return [pytest.param(*v.values, id=k, marks=v.marks) if hasattr(v, "marks") else pytest.param(*v, id=k)
            for k, v in table.items()]


@pytest.mark.parametrize("contents, overrides, names", params(REFUSED))
def test_refused_with_exit_2_one_line_naming_the_key_and_nothing_written(contents, overrides: list[str], names: str,
                                                                         tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "c.yaml"]
    if contents == "<missing>":
        argv = ["--config", "missing.yaml"]
    elif contents == "<default>":
        argv = []  # train.py's default, config.yaml, is not in this folder
    elif contents == "<folder>":
        (tmp_path / "conf.d").mkdir()
        argv = ["--config", "conf.d"]
    elif contents is None:
        (tmp_path / "c.yaml").write_text("seed: 0\n")
    else:
        (tmp_path / "c.yaml").write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main([*argv, *overrides])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert names in line, line
    assert out == ""
    assert files_under(tmp_path) == before  # no runs/, data/ or wandb/


# ---------------------------------------------------------------- what is accepted, and how it reads

@pytest.mark.parametrize("text", ["1e-4", "1E-4", "+1e-4", "1.0e-4", "0.0001", ".0001", "10e-5"])
def test_scientific_notation_reads_as_a_float_in_the_file_and_on_the_command_line(text: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\ndiffusion:\n  beta_start: {text}\n")
    from_file = config.load_config(path)
    from_cli = config.load_config(None, [f"train.lr={text}", f"diffusion.beta_start={text}"])
    for cfg in (from_file, from_cli):
        assert type(cfg.train.lr) is float and cfg.train.lr == 0.0001
        assert cfg.diffusion.beta_start == 0.0001


@given(st.floats(min_value=1e-30, max_value=10, allow_subnormal=False),
       st.sampled_from(["{!r}", "{:e}", "{:E}", "{:.3e}", "{:g}"]))
def test_any_float_spelling_reads_as_that_float(value: float, spelling: str) -> None:
    text = spelling.format(value)
    assume(0 < float(text) <= 10)
    assert config.load_config(None, [f"train.lr={text}"]).train.lr == float(text)


@pytest.mark.parametrize("override, key, value", [
    ("model.attn_resolutions=[]", "model.attn_resolutions", ()),
    ("model.channel_mult=[1, 2]", "model.channel_mult", (1, 2)),
    ("model.channel_mult=[1,2,2]", "model.channel_mult", (1, 2, 2)),
    ("data.subset=null", "data.subset", None),
    ("data.subset=~", "data.subset", None),
    ("data.subset=", "data.subset", None),
    ("data.subset=512", "data.subset", 512),
    ("data.random_flip=false", "data.random_flip", False),
    ("data.random_flip=true", "data.random_flip", True),
    ("train.grad_clip=null", "train.grad_clip", None),
    ("train.compile=true", "train.compile", True),
    ("train.compile=auto", "train.compile", "auto"),
    ("train.lr=1", "train.lr", 1.0),  # an int where a float is expected
    ("sample.steps=null", "sample.steps", None),
    ("data.source=file:///tmp/cifar.tar.gz", "data.source", "file:///tmp/cifar.tar.gz"),
    ("data.md5=C58F30108F718F92721AF3B95E74349A", "data.md5", "C58F30108F718F92721AF3B95E74349A"),
    ("wandb.entity=null", "wandb.entity", None),
    ("out_dir=runs/a b", "out_dir", "runs/a b"),
    ("seed=9223372036854775807", "seed", 2**63 - 1),
    ("device=cuda:1", "device", "cuda:1"),
])
def test_dotted_overrides_take_yaml_values(override: str, key: str, value) -> None:
    cfg = config.load_config(None, [override])
    assert config.flatten(config.to_dict(cfg))[key] == (list(value) if isinstance(value, tuple) else value)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value and type(node) is type(value)


def test_overrides_apply_in_order_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  batch_size: 64\n")
    cfg = config.load_config(path, ["train.lr=3e-4", "train.lr=5e-4"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (5e-4, 64, config.Train().epochs)
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert config.load_config(tmp_path / "empty.yaml") == config.load_config(None) == config.Config()


def test_to_dict_and_from_dict_round_trip() -> None:
    cfgs = [config.Config(), config.load_config(None, [
        "seed=7", "model.channel_mult=[1, 2]", "model.attn_resolutions=[]", "data.subset=null",
        "train.grad_clip=null", "train.compile=false", "sample.steps=10", "wandb.mode=disabled"])]
    for cfg in cfgs:
        d = config.to_dict(cfg)
        assert config.from_dict(d) == cfg
        assert json.loads(json.dumps(d)) == d  # plain values: lists, not tuples
        assert config.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
        assert config.load_config(None, [f"{k}={json.dumps(v)}" for k, v in config.flatten(d).items()]) == cfg


def test_config_yaml_equals_the_dataclass_defaults() -> None:
    """The file and the code cannot drift: the same keys, the same values."""
    raw = config.read_yaml(ROOT / "config.yaml")
    assert set(config.flatten(raw)) == set(config.flatten(config.to_dict(config.Config())))
    assert config.load_config(ROOT / "config.yaml") == config.Config()


def test_defaults_follow_the_paper() -> None:
    """Ho et al. 2020, §4 and Appendix B, for CIFAR-10."""
    c = config.Config()
    assert (c.train.batch_size, c.train.optimizer, c.train.lr) == (128, "adam", 2e-4)
    assert (c.train.warmup_steps, c.train.grad_clip, c.train.ema_decay) == (5000, 1.0, 0.9999)
    assert (c.model.channels, c.model.channel_mult, c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (c.model.attn_resolutions, c.model.dropout, c.data.random_flip) == ((16,), 0.1, True)
    assert (c.diffusion.num_timesteps, c.diffusion.schedule) == (1000, "linear")
    assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
    assert (c.data.dataset, c.sample.sampler, c.sample.clip) == ("cifar10", "ddpm", True)
    # Samples with σ² = β at all T steps: "auto" is β there (β̃ only when respaced).
    assert ddpm.resolve_variance(c.sample.variance, c.sample.steps, c.diffusion.num_timesteps) == "beta"
    steps = c.train.epochs * math.ceil(50_000 / c.train.batch_size)  # 800k steps (paper)
    assert abs(steps - 800_000) <= math.ceil(50_000 / c.train.batch_size), steps


# ---------------------------------------------------------------- hypothesis: malformed configs

SECTIONS = [f.name for f in dataclasses.fields(config.Config)]
FIELDS = sorted({f.name for s in (config.Data, config.Model, config.Diffusion, config.Train, config.Sample,
                                  config.Wandb) for f in dataclasses.fields(s)})
DOTTED = sorted(config.flatten(config.to_dict(config.Config())))

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["1e-4", "auto", "cifar10", "linear", "adam", "beta", "offline", "runs/x", "cuda:0"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4), max_leaves=12)
keys = st.sampled_from(SECTIONS) | st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers(-3, 3) | st.none()
documents = st.one_of(
    values,  # anything at the top level
    st.dictionaries(keys, values, max_size=6),  # a mapping of random sections
    st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(FIELDS), scalars | st.lists(
        st.integers(-40, 40), max_size=6), max_size=4), max_size=4),  # real names, random values: the checks
).map(lambda doc: yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
texts = documents | st.text(max_size=60) | st.binary(max_size=60)  # also malformed YAML and undecodable bytes
override_strings = st.text(max_size=30) | st.builds(
    "{}={}".format, st.sampled_from(DOTTED) | st.text(max_size=10),
    st.text(max_size=15) | scalars.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))


def load_or_refuse(path: Path, overrides: list[str]) -> config.Config | str:
    """load_config's answer: a Config, or the ConfigError's message (checked to be one non-empty line)."""
    try:
        cfg = config.load_config(path, overrides)
    except config.ConfigError as e:
        message = str(e)
        assert message and len(message.splitlines()) == 1 and message == message.strip(), repr(message)
        return message
    assert isinstance(cfg, config.Config)
    assert config.from_dict(config.to_dict(cfg)) == cfg
    return cfg


def write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, overrides=st.lists(override_strings, max_size=3))
def test_any_file_and_overrides_give_a_config_or_a_one_line_error(text, overrides: list[str],
                                                                  tmp_path_factory) -> None:
    path = tmp_path_factory.getbasetemp() / "hypothesis-config.yaml"
    write(path, text)
    assert isinstance(load_or_refuse(path, overrides), (config.Config, str))  # it asserts the one-line form too


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking:
          suppress_health_check=[HealthCheck.too_slow])  # each example is a ~2 s process; a failure shows as drawn
@given(text=texts, overrides=st.lists(override_strings, max_size=2))
@example(text="train:\n  lr: -1\n", overrides=["model.attn_resolutions=[]"])
def test_the_cli_refuses_malformed_configs_with_exit_2_one_line_and_nothing_written(text, overrides: list[str],
                                                                                    tmp_path_factory) -> None:
    assume(not any("\x00" in o for o in overrides))  # a process argument cannot hold a NUL byte
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    write(folder / "bad.yaml", text)
    with contextlib.chdir(folder):
        answer = load_or_refuse(Path("bad.yaml"), overrides)
    assume(isinstance(answer, str))  # a valid config would start training
    result = run_cli("train.py", "--config", "bad.yaml", "--", *overrides, cwd=folder)
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == f"error: {answer}"
    assert files_under(folder) == {"bad.yaml"}
    shutil.rmtree(folder)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_committed_preset_is_a_valid_config(preset: str) -> None:
    """The presets README and docs/quality.md tell users to run load and pass every check (a sampler or a model
    the config refuses would otherwise surface only when the command is run). None flips: Fashion-MNIST's shoes all
    point one way, and half-flipped real images already score 7x the FID floor (docs/quality.md, flips off)."""
    cfg = config.load_config(ROOT / "configs" / preset)
    assert cfg.data.dataset == "fashion-mnist" and cfg.out_dir.startswith("runs/")
    assert cfg.data.random_flip is False
