"""Run configuration: one frozen dataclass per concern, composed into ``RunConfig``.

``load("default", ["quantizer.name=vq_ema", "train.steps=200"])`` reads a preset shipped in
``vqlab/configs/`` (or a YAML path), applies dotted overrides and validates everything before
anything is loaded or written. ``to_yaml``/``from_yaml`` round-trip exactly.

As each quantizer and backbone owns its config, the evaluators own theirs: ``EvalConfig`` (the
``eval`` section) lives in ``vqlab.evalconfig``, which imports no evaluator.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from vqlab.evalconfig import EvalConfig
from vqlab.models import BackboneConfig
from vqlab.models.conv import ConvConfig
from vqlab.quantizers import QuantizerConfig
from vqlab.quantizers.fsq import FSQConfig
from vqlab.schema import ConfigError, flatten, parse, require, section_class, to_dict

PRESETS = resources.files("vqlab") / "configs"


@dataclass(frozen=True)
class DataConfig:
    name: Literal["photos", "shapes", "synthetic", "imagefolder", "cifar10", "cifar100"] = "photos"
    root: str = ""  # imagefolder / cifar: where the files are
    val_root: str = ""  # imagefolder: a separate validation folder (else a held-out split of root)
    image_size: int = 32
    batch_size: int = 64
    val_batch_size: int = 128
    val_count: int = 512  # validation images (photos/shapes: generated; imagefolder: held out)
    train_count: int = 20000  # photos/shapes: crops or images per epoch
    num_workers: int = 0
    flip: bool = True
    on_device: bool = False  # photos / synthetic: training batches made on the training device, no workers
    # photos: validate on crops of training photos held out from training (data.TUNING_PHOTOS), never on
    # the validation photos; recipes are tuned this way, so the validation crops stay unseen
    tuning: bool = False

    def __post_init__(self):
        require(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.val_batch_size >= 1, "val_batch_size", f"must be >= 1, got {self.val_batch_size}")
        require(self.val_count >= 1, "val_count", f"must be >= 1, got {self.val_count}")
        require(self.train_count >= 1, "train_count", f"must be >= 1, got {self.train_count}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        if self.name in ("imagefolder", "cifar10", "cifar100"):
            require(bool(self.root), "root", f"data.name={self.name} needs data.root, the folder holding the files")
        require(
            not self.on_device or self.name in ("photos", "synthetic"),
            "on_device",
            f"only photos and synthetic make their batches on the device; {self.name} decodes on the CPU "
            "(raise data.num_workers instead)",
        )
        require(
            not self.tuning or self.name == "photos",
            "tuning",
            f"only photos hold training photos out for tuning; {self.name} has no tuning split",
        )


@dataclass(frozen=True)
class PerceptualConfig:
    weight: float = 0.0  # LPIPS weight; 0 builds nothing
    net: Literal["alex", "vgg", "squeeze"] = "alex"
    weights_path: str = ""  # the trunk's ImageNet weights; empty = the torch hub cache

    def __post_init__(self):
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class AdversarialConfig:
    weight: float = 0.0  # 0 builds no discriminator
    loss: Literal["hinge", "non_saturating"] = "hinge"
    start_step: int = 0  # optimizer step at which the discriminator and its loss start
    adaptive: bool = True  # VQGAN's adaptive weight from the decoder's last layer
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    width: int = 64
    layers: int = 3
    lecam: float = 0.0  # LeCAM regulariser weight; 0 = off
    lecam_decay: float = 0.99
    r1: float = 0.0  # R1 gradient penalty weight; 0 = off

    def __post_init__(self):
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        require(self.start_step >= 0, "start_step", f"must be >= 0, got {self.start_step}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.layers >= 1, "layers", f"must be >= 1, got {self.layers}")
        require(self.lecam >= 0, "lecam", f"must be >= 0, got {self.lecam}")
        require(0 <= self.lecam_decay < 1, "lecam_decay", f"must be in [0, 1), got {self.lecam_decay}")
        require(self.r1 >= 0, "r1", f"must be >= 0, got {self.r1}")


@dataclass(frozen=True)
class LossConfig:
    l1: float = 1.0
    l2: float = 0.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self):
        require(self.l1 >= 0, "l1", f"weight must be >= 0, got {self.l1}")
        require(self.l2 >= 0, "l2", f"weight must be >= 0, got {self.l2}")
        require(self.l1 + self.l2 > 0, "l1", "at least one reconstruction loss needs a positive weight")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # sgd: betas[0] is the momentum
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self):
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; quantizers keep their fp32 island
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step (per rank)
    ema_decay: float = 0.0  # model EMA of weights and buffers, evaluated beside the raw model; 0 = off
    compile: bool = False  # torch.compile the training model
    log_every: int = 25
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class TrackingConfig:
    root: str = "runs"  # run folders live in <root>/<experiment>/[<run_group>/]<run>/
    experiment: str = "default"
    run_name: str = ""  # empty: <timestamp>-<quantizer>
    run_group: str = ""  # a folder between the experiment and the run (a sweep's variant, its runs the seeds)
    mlflow: bool = True
    mlflow_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    parent_run_id: str = ""  # an MLflow run (a sweep's) that this run is nested under
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags of the run
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self):
        require(bool(self.root) and "\0" not in self.root, "root", "must name a folder")
        require(bool(self.experiment), "experiment", "must name the folder of the runs, not be empty")
        # <root>/<experiment>/[<run_group>/]<run_name> is written to: each name is one folder, and it
        # resolves (through any link) to a folder inside tracking.root, not to one above it
        root = Path(self.root).resolve()
        above = [root]
        for key, name in (("experiment", self.experiment), ("run_group", self.run_group), ("run_name", self.run_name)):
            if not name:
                continue
            require(
                name not in (".", "..") and not any(c in name for c in "/\\\0"),
                key,
                f"{name!r} is not a folder name: give a name without '/', '\\' or NUL that is not '.' or '..'",
            )
            folder = (above[-1] / name).resolve()
            require(
                root in folder.parents and folder not in above,
                key,
                f"{name!r} resolves to {folder}, outside tracking.root {root} (a link?); "
                "run folders stay inside tracking.root",
            )
            above.append(folder)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: BackboneConfig = field(default_factory=ConvConfig)
    quantizer: QuantizerConfig = field(default_factory=FSQConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        factor = self.model.downsample
        require(
            self.data.image_size % factor == 0,
            "data.image_size",
            f"{self.data.image_size} is not divisible by the {self.model.name} backbone's downsampling factor {factor}",
        )
        require(
            self.loss.adversarial.weight == 0 or self.loss.adversarial.start_step < self.train.steps,
            "loss.adversarial.start_step",
            f"{self.loss.adversarial.start_step} is not before train.steps ({self.train.steps})",
        )
        require(
            self.optim.warmup_steps < self.train.steps,
            "optim.warmup_steps",
            f"{self.optim.warmup_steps} must be smaller than train.steps ({self.train.steps})",
        )


def from_dict(data: dict[str, Any]) -> RunConfig:
    return parse(RunConfig, data)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_yaml(text: str, source: str = "the config text") -> RunConfig:
    """``source`` (a file name) is what errors in ``text`` cite."""
    data = parse_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{source} must hold a mapping of sections")
    return from_dict(data)


def parse_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML (safe tags only). A syntax error, or a key repeated in one mapping
    (which PyYAML would silently resolve to the last), is a ``ConfigError`` naming ``source``."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            repeated = repeated_key(node)
            if repeated is not None:
                path, first, again = repeated
                raise ConfigError(path, f"given twice in {source}, on lines {first.line + 1} and {again.line + 1}")
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError("", f"{source} is not valid YAML: {yaml_error_text(err)}") from None


def repeated_key(node: yaml.Node | None, path: str = "") -> tuple[str, yaml.Mark, yaml.Mark] | None:
    """The first key given twice in one mapping below ``node``: its dotted path and both places."""
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" entries may be overridden
                continue
            name = f"{path}.{key_node.value}" if path else str(key_node.value)
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key_node.value) in seen:
                    return name, seen[key_node.tag, key_node.value], key_node.start_mark
                seen[key_node.tag, key_node.value] = key_node.start_mark
            children.append((name, value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
    for name, child in children:
        found = repeated_key(child, name)
        if found is not None:
            return found
    return None


def yaml_error_text(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message in one line, with 1-based line and column numbers."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{where}{err.problem or err.context}{context}"
    if isinstance(err, yaml.reader.ReaderError):
        character = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        return f"position {err.position}: unacceptable character {character}: {err.reason}"
    return " ".join(str(err).split())


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def read_source(source: str) -> dict[str, Any]:
    """A preset name or a YAML path -> its raw dict."""
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.exists():
        if path.is_dir():
            raise ConfigError("", f"config file {source} is a directory; name a YAML file")
        if not path.is_file():
            raise ConfigError("", f"config file {source} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError("", f"cannot read config file {source}: {err}") from None
    else:
        preset = PRESETS / f"{source}.yaml"
        if not preset.is_file():
            raise ConfigError(
                "", f"unknown preset {source!r}; presets: {', '.join(presets())}, or a path to a .yaml file"
            )
        text = preset.read_text()
    data = parse_yaml(text, source)
    if data is None:  # silently running the default config instead would be a run nobody asked for
        raise ConfigError(
            "", f"{source} holds no settings (it is empty or only comments); give a preset or the sections to set"
        )
    if not isinstance(data, dict):
        raise ConfigError("", f"{source} must hold a mapping of sections")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, f"override {text!r} is not of the form section.key=value")
    try:
        return key, parse_yaml(raw, f"value {raw!r}") if raw else ""
    except ConfigError as err:
        raise err.under(key) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=2"]`` -> ``{"a.b": 1, "c": 2}``; a key given twice is an error, not the last one winning."""
    pairs: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in pairs:
            raise ConfigError(key, f"given twice ({text!r} after {key}={pairs[key]!r}); give each key once")
        pairs[key] = value
    return pairs


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of ``data``. Setting a variant section's ``name`` (a quantizer, a
    backbone, a composite quantizer's base) to another value drops that section's other keys,
    which belong to the previous variant; shallower names are applied first."""
    data = copy.deepcopy(data)
    names_first = sorted(overrides.items(), key=lambda kv: (not kv[0].endswith(".name"), kv[0].count(".")))
    for key, value in names_first:
        parts = key.split(".")
        if parts[-1] == "name" and len(parts) > 1:
            section_cls = section_class(RunConfig, data, parts[:-1])
            if section_cls is not None and hasattr(section_cls, "variant"):
                parent = data
                for part in parts[:-2]:
                    parent = parent.setdefault(part, {})
                section = parent.get(parts[-2]) or {}
                if section.get("name") != value:
                    parent[parts[-2]] = {"name": value}
                    continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load(source: str | dict[str, Any] = "default", overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """A preset name, YAML path or dict, plus overrides (``["a.b=1"]`` or ``{"a.b": 1}``) -> RunConfig."""
    data = copy.deepcopy(source) if isinstance(source, dict) else read_source(source)
    pairs = dict(overrides) if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    return from_dict(apply_overrides(data, pairs))


def flat_params(cfg: RunConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.0001, ...}`` for experiment trackers."""
    return flatten(to_dict(cfg))
