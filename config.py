"""One validated config: `config.yaml` + dotted overrides -> frozen, typed dataclasses.

Every check on a user's settings lives here, and every failure is a `ConfigError` whose one-line
message names the key (or the file). `cli()` turns that into exit status 2 with no traceback, so
data.py and train.py share one grammar: `--config FILE key.sub=value ...` (values are YAML).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ddpm import SAMPLERS, SPACINGS, VARIANCES, Sampling


GROUPS = 32  # GroupNorm's groups in the paper's network (model.norm_groups' default)


def check_unet_args(channels: int, channel_mult: Sequence[int], attn_resolutions: Sequence[int], image_size: int,
                    in_channels: int = 3, norm_groups: int = GROUPS) -> None:
    """Raise ValueError for settings the network cannot be built with (UNet uses this too)."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if norm_groups < 1:
        raise ValueError(f"norm_groups must be >= 1, got {norm_groups}")
    if channels < 1 or channels % norm_groups:
        raise ValueError(f"channels must be a positive multiple of {norm_groups} (GroupNorm groups), got {channels}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be non-empty positive integers, got {tuple(channel_mult)}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by 2^(len(channel_mult) - 1) = {factor}")
    reached = {image_size // 2 ** i for i in range(len(channel_mult))}
    missing = sorted(set(attn_resolutions) - reached)
    if missing:
        raise ValueError(f"attn_resolutions {missing} are never reached (resolutions: {sorted(reached, reverse=True)})")


class ConfigError(ValueError):
    """A bad setting. The message is one line and names the key or the file."""

    def __init__(self, message: str):
        text = " ".join(str(message).split())  # one line, even when a key or a YAML error has newlines
        super().__init__(text if len(text) <= 300 else text[:297] + "...")  # and short, whatever the value was


def _check(fn: Callable[[Any], bool], what: str) -> dict:
    return {"check": fn, "what": what}


def _choices(*options: Any) -> dict:
    return _check(lambda v: v in options and type(v) in {type(o) for o in options},
                  "one of " + ", ".join(map(str, options)))


def _safe_relative(value: str) -> bool:
    """Outputs stay in a folder of their own under the working folder: not `.`, not absolute, no `..`."""
    p = Path(value)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts and "\x00" not in value


_POS = _check(lambda v: v > 0, "> 0")
_NONNEG = _check(lambda v: v >= 0, ">= 0")
_PROB = _check(lambda v: 0 <= v < 1, "in [0, 1)")
_UNIT_OPEN = _check(lambda v: 0 < v < 1, "in (0, 1)")


@dataclass(frozen=True)
class Data:
    dataset: str = field(default="cifar10", metadata=_choices("cifar10", "fashion-mnist"))
    source: str | None = None  # URL or path; None: the dataset's official source
    md5: str | None = field(default=None, metadata=_check(
        lambda v: v is None or re.fullmatch(r"[0-9a-fA-F]{32}", v) is not None, "32 hex digits"))
    root: str = "data/raw"  # download cache
    subset: int | None = field(default=None, metadata=_check(lambda v: v is None or v >= 1, ">= 1"))
    random_flip: bool = True
    # pixels cut from each side of the prepared 32x32 images as they are loaded: 2 trains Fashion-MNIST at its native
    # 28x28 (data.py pads it with 2 zero pixels each side, which the FID classifier cuts again)
    crop: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 15, "in [0, 15]"))
    num_workers: int = field(default=0, metadata=_check(lambda v: v == 0, "0 (the in-memory loader)"))


@dataclass(frozen=True)
class Model:
    channels: int = field(default=128, metadata=_POS)
    channel_mult: tuple[int, ...] = field(default=(1, 2, 2, 2), metadata=_check(
        lambda v: 1 <= len(v) <= 5 and all(m >= 1 for m in v), "1 to 5 integers >= 1"))
    num_res_blocks: int = field(default=2, metadata=_check(lambda v: 1 <= v <= 8, "in [1, 8]"))
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = field(default=0.1, metadata=_PROB)
    norm_groups: int = field(default=GROUPS, metadata=_POS)  # GroupNorm's groups; channels must be a multiple


@dataclass(frozen=True)
class Diffusion:
    num_timesteps: int = field(default=1000, metadata=_check(lambda v: 1 <= v <= 100_000, "in [1, 100000]"))
    beta_start: float = field(default=1e-4, metadata=_UNIT_OPEN)
    beta_end: float = field(default=0.02, metadata=_UNIT_OPEN)
    schedule: str = field(default="linear", metadata=_choices("linear", "cosine"))


@dataclass(frozen=True)
class Train:
    epochs: int = field(default=2046, metadata=_check(lambda v: 1 <= v <= 10**7, "in [1, 10000000]"))
    batch_size: int = field(default=128, metadata=_check(lambda v: 1 <= v <= 2**20, "in [1, 1048576]"))
    optimizer: str = field(default="adam", metadata=_choices("adam", "sgd"))
    lr: float = field(default=2e-4, metadata=_check(lambda v: 0 < v <= 10, "in (0, 10]"))
    momentum: float = field(default=0.9, metadata=_PROB)
    weight_decay: float = field(default=0.0, metadata=_NONNEG)
    warmup_steps: int = field(default=5000, metadata=_NONNEG)
    lr_schedule: str = field(default="constant", metadata=_choices("constant", "cosine", "linear"))
    min_lr: float = field(default=0.0, metadata=_NONNEG)  # where cosine/linear end, at the run's last step
    max_steps: int | None = field(default=None, metadata=_check(lambda v: v is None or v >= 1, ">= 1 or null"))
    grad_clip: float | None = field(default=1.0, metadata=_check(lambda v: v is None or v > 0, "> 0 or null"))
    ema_decay: float = field(default=0.9999, metadata=_PROB)
    ema_warmup: bool = False  # diffusers' EMAModel(use_ema_warmup=True): decay min(ema_decay, 1 - (1 + s/γ)^-p)
    ema_inv_gamma: float = field(default=1.0, metadata=_POS)
    ema_power: float = field(default=2 / 3, metadata=_POS)
    loss_weighting: str = field(default="none", metadata=_choices("none", "min_snr"))
    snr_gamma: float = field(default=5.0, metadata=_POS)  # min_snr only (Hang et al. 2023)
    precision: str = field(default="auto", metadata=_choices("auto", "fp32", "bf16", "fp16"))
    compile: bool | str = field(default="auto", metadata=_choices("auto", True, False))
    channels_last: bool | str = field(default="auto", metadata=_choices("auto", True, False))
    checkpoint_every: int = field(default=5000, metadata=_check(lambda v: v >= 1, ">= 1"))


_SAMPLING = Sampling()  # the sampler's defaults: ddpm.sample's


@dataclass(frozen=True)
class Sample:
    """The training grids (`every_epochs`, `num_images`) and the sampler they and FID during training use: the
    other keys, ddpm.Sampling's (`sampling`)."""
    every_epochs: int = field(default=10, metadata=_check(lambda v: v >= 0, ">= 0 (0: never)"))
    num_images: int = field(default=64, metadata=_check(lambda v: 1 <= v <= 100_000, "in [1, 100000]"))
    steps: int | None = field(default=_SAMPLING.steps, metadata=_check(lambda v: v is None or v >= 1, ">= 1 or null"))
    sampler: str = field(default=_SAMPLING.sampler, metadata=_choices(*SAMPLERS))
    eta: float = field(default=_SAMPLING.eta, metadata=_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    spacing: str = field(default=_SAMPLING.spacing, metadata=_choices(*SPACINGS))
    variance: str = field(default=_SAMPLING.variance, metadata=_choices(*VARIANCES))
    clip: bool = _SAMPLING.clip

    @property
    def sampling(self) -> Sampling:
        """The sampler settings, whole, as sample.generate and ddpm.sample take them."""
        return Sampling(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Sampling)})


@dataclass(frozen=True)
class Eval:
    """Sample quality during training: FID of `num_samples` EMA samples drawn with the sample.* sampler."""
    every_epochs: int = field(default=0, metadata=_check(lambda v: v >= 0, ">= 0 (0: never)"))
    num_samples: int = field(default=500, metadata=_check(lambda v: 10 <= v <= 100_000, "in [10, 100000]"))
    features: str = field(default="auto", metadata=_choices("auto", "fashion-mnist", "inception"))


@dataclass(frozen=True)
class Wandb:
    mode: str = field(default="auto", metadata=_choices("auto", "online", "offline", "disabled"))
    project: str = "ddpm-cifar10"
    entity: str | None = None
    log_every: int = field(default=100, metadata=_check(lambda v: v >= 1, ">= 1"))


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=_check(lambda v: 0 <= v < 2**63, "in [0, 2**63)"))
    device: str = field(default="auto", metadata=_check(
        lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", v) is not None, "auto, cpu, cuda or cuda:N"))
    out_dir: str = field(default="runs/default", metadata=_check(_safe_relative, "a relative path without '..'"))
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    diffusion: Diffusion = field(default_factory=Diffusion)
    train: Train = field(default_factory=Train)
    sample: Sample = field(default_factory=Sample)
    eval: Eval = field(default_factory=Eval)
    wandb: Wandb = field(default_factory=Wandb)


# Keys that may change between an interrupted run and its resume without changing what it trains. sample.* only
# shape the preview grids drawn after the resume (the weights, history and metrics do not depend on them), and
# checkpoints written before a sample key existed must still resume.
RESUMABLE_KEYS = frozenset({"device", "train.epochs", "train.max_steps", "train.checkpoint_every", "data.num_workers",
                            "data.root", "data.source", "data.md5", "wandb.mode", "wandb.project", "wandb.entity",
                            "wandb.log_every",
                            *(f"sample.{f.name}" for f in dataclasses.fields(Sample))})


def resumable_keys(cfg: Config) -> frozenset[str]:
    """RESUMABLE_KEYS, less the sample.* keys when FID during training (eval.every_epochs) samples with them, and
    less train.epochs and train.max_steps when the learning rate decays to the run's last step (they set it)."""
    keys = RESUMABLE_KEYS
    if cfg.eval.every_epochs:
        keys -= {f"sample.{f.name}" for f in dataclasses.fields(Sample)}
    if cfg.train.lr_schedule != "constant":
        keys -= {"train.epochs", "train.max_steps"}
    return keys


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} has the wrong type")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # PyYAML reads 1e-4 as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max or not math.isfinite(value):  # an int too large for a float too
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}"[:200])
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in raw:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], raw[f.name], key + ".")
            continue
        value = _coerce(raw[f.name], hints[f.name], key)
        if "check" in f.metadata and not f.metadata["check"](value):
            raise ConfigError(f"{key}: {value!r} is out of range (must be {f.metadata['what']})"[:300])
        kwargs[f.name] = value
    return cls(**kwargs)


def image_size(cfg: Config) -> int:
    """The side of the images a run trains on and samples: data.py prepares both datasets at 32x32, less data.crop
    on each side."""
    return 32 - 2 * cfg.data.crop


def _cross_checks(cfg: Config) -> None:
    d, s = cfg.diffusion, cfg.sample
    if d.beta_start > d.beta_end:  # make_schedule checks this for every kind
        raise ConfigError(f"diffusion.beta_start: {d.beta_start} is larger than diffusion.beta_end {d.beta_end}")
    _check_sampler(s, "sample.", d.num_timesteps, "diffusion.num_timesteps")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr: {cfg.train.min_lr} is larger than train.lr {cfg.train.lr}")
    if cfg.eval.features == "fashion-mnist" and cfg.data.dataset != "fashion-mnist":
        raise ConfigError(f"eval.features: fashion-mnist scores Fashion-MNIST samples, not {cfg.data.dataset} "
                          "(use auto or inception)")
    try:
        check_unet_args(cfg.model.channels, cfg.model.channel_mult, cfg.model.attn_resolutions, image_size(cfg),
                        norm_groups=cfg.model.norm_groups)
    except ValueError as e:
        raise ConfigError(f"model: {e}" + (f" (data.crop {cfg.data.crop})" if cfg.data.crop else "")) from None


def _check_sampler(s: Sample, prefix: str, num_timesteps: int, timesteps_key: str) -> None:
    """The checks on the sampler settings that involve another setting; keys are `prefix` + field name."""
    if s.steps is not None and s.steps > num_timesteps:
        raise ConfigError(f"{prefix}steps: {s.steps} is more than {timesteps_key} {num_timesteps}")
    if s.sampler != "ddim" and s.eta != 0:
        raise ConfigError(f"{prefix}eta: {s.eta} applies to {prefix}sampler ddim only ({s.sampler} has no eta)")


def sampling_from_flags(values: dict[str, Any], num_timesteps: int) -> Sampling:
    """The sampler settings a command line gives (`values` by field name: --steps, --sampler, --eta, --spacing,
    --variance, --clip), checked as sample.* are in a config, for a model of `num_timesteps`: one check, one wording,
    a ConfigError that names the flag."""
    s = _build(Sample, values, "--")
    _check_sampler(s, "--", num_timesteps, "the model's num_timesteps")
    return s.sampling


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a config needs none, and a few hundred bytes of nested aliases
    ("billion laughs") expand to more values than memory holds as soon as anything walks them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: no Python objects


def _set(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    try:
        value = _yaml_load(text) if text.strip() else None
    except Exception as e:  # YAMLError, RecursionError, and PyYAML's plain ValueError/KeyError for bad tags or dates
        raise ConfigError(f"{key}: cannot parse {text!r} as YAML ({type(e).__name__})") from None
    *parents, leaf = key.split(".")
    node, cls = raw, Config
    for i, p in enumerate(parents):
        sub = {f.name: f for f in dataclasses.fields(cls)}.get(p)
        if sub is None or not dataclasses.is_dataclass(typing.get_type_hints(cls)[p]):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: unknown section in override {override!r}")
        cls = typing.get_type_hints(cls)[p]
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: expected a mapping")
    if leaf not in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(f"{key}: unknown key")
    node[leaf] = value


def read_yaml(path: str | Path) -> dict:
    """Read a config file; every way it can be unreadable is a one-line ConfigError."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
        raw = _yaml_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    except (RecursionError, OSError) as e:
        raise ConfigError(f"{path}: cannot read config ({type(e).__name__})") from None
    except Exception as e:  # PyYAML's constructors raise plain ValueError, KeyError, ... for `!!int x` or `2020-13-45`
        raise ConfigError(f"{path}: malformed YAML ({type(e).__name__}: {e})"[:300]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build the validated Config from a YAML file (None: all defaults) and `key.sub=value` overrides."""
    raw = read_yaml(path) if path is not None else {}
    for o in overrides:
        _set(raw, o)
    try:
        cfg = _build(Config, raw, "")
    except RecursionError:
        raise ConfigError("config: nested too deeply") from None
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, not tuples): for YAML, JSON, wandb and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v
    return plain(dataclasses.asdict(cfg))


def from_dict(d: dict) -> Config:
    """Inverse of to_dict (used when a checkpoint is loaded)."""
    return _build(Config, d, "")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def cli(description: str, argv: Sequence[str] | None = None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse `--config FILE [key=value ...]`; on a bad config print one line and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="config.yaml", help="YAML config file (default: config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config key (YAML value)")
    if extra:
        extra(parser)
    args = parser.parse_intermixed_args(argv)  # options may come before or after the overrides
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as e:
        fail(str(e))


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """One clear line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
