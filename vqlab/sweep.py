"""``python -m vqlab.sweep <sweep.yaml | preset>``: one executed notebook per variant and seed of a study.

A sweep file is YAML::

    name: quantizers                  # runs/<name>[-<scale>]/<variant>/ and the MLflow experiment
    base: default                     # a preset or a config file (relative to the sweep file)
    notebook: notebooks/run.ipynb     # optional; relative to the current folder
    overrides: {train.steps: 3000}    # optional; every variant
    variants:                         # a variant's name -> its dotted overrides
      fsq: {quantizer.name: fsq}
      lfq: {quantizer.name: lfq}
    grid:                             # dotted key -> values, crossed (and crossed with the variants)
      train.dtype: [fp32, bf16]
      large: {quantizer.name: fsq, imagenet: {optim.lr: 2.0e-4}}   # a scale's own overrides
    seeds: [0, 1, 2]                  # optional: every variant once per seed (train.seed), each run in
                                      # runs/<name>[-<scale>]/<variant>/seed<k>/
    controls: identity                # optional: each variant's continuous floor, run beside it
    scales:                           # named override sets, chosen with --scale (default: the first);
      photos: {grid: {train.dtype: [fp32]}}   # a scale's ``base``, ``grid`` and ``seeds`` replace the sweep's
      imagenet: {base: reproduction}

``seeds`` (or ``--seeds 0,1,2``, which replaces the file's) is a non-empty list of distinct
non-negative integers; a variant that sets ``train.seed`` itself (its overrides, the grid, the
sweep's overrides or the command line) while seeds are given is an error naming it. A run is one
(variant, seed): its folder ``<variant>/seed<k>`` (``tracking.run_group`` the variant,
``tracking.run_name`` ``seed<k>``), its MLflow run named ``<variant>/seed<k>`` and tagged
``variant`` (the variant's name) and ``seed`` (the integer, as text). Runs go seed by seed, so the
first seed of every variant finishes first. Without seeds a run is a variant: its folder
``<variant>``, no ``seed`` tag, its seed the base's.

``controls: identity`` adds, for every variant, its continuous floor: the same recipe (every
override but the quantizer's) with the quantizer replaced by ``identity`` at the variant's latent
width, as a variant ``identity-d<width>`` (one per distinct width and recipe, at every seed; a
variant of the sweep that already is that run serves instead). Each quantized variant's runs are
tagged ``floor`` with its floor's name, each floor's ``control``; the report pairs them by seed
into the "quantization gap" column.

Every run's config is built and validated before anything runs; an invalid one stops the sweep
naming the variant and the key. Each run is one papermill execution of the notebook into
``runs/<sweep>/<variant>[/seed<k>]/run.ipynb`` (``vqlab.notebook.execute``) with ``resume="auto"``
semantics, nested in MLflow under one parent run of the sweep (tags ``sweep``, ``variant``,
``seed``, ``git_commit``). A failed run becomes a FAILED MLflow run holding the failing cell, the
error and the traceback's tail (``error.txt``); the others go on and the command exits with status
1 naming the failures (``<variant>/seed<k>``). A rerun skips the runs whose MLflow run FINISHED
(matched on their ``variant`` and ``seed`` tags) and continues the others from their newest
checkpoint. ``--reuse <experiment>[,...]`` copies instead of training each run whose recipe (its
config but ``tracking``) a finished run of those experiments trained, its folder finished on this
machine (e.g. the continuous floors another sweep ran at the same recipe and seeds): the folder is
copied, and the MLflow run gets the source's params, metric histories, artifacts, times and the
tags of what made it (commit, threads, CPU), tagged ``vqlab.reused_from``; a run whose copy fails
is trained instead. ``--variants '*_10bit'`` runs only the variants whose names match (and their floors);
``--shard k/n`` runs every n-th run (machines sharing one ``MLFLOW_TRACKING_URI``
share the sweep; the n shards partition its (variant, seed) runs); ``--launcher submitit``
submits one job per run. ``--dry-run`` lists every run and its folder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vqlab import notebook
from vqlab.config import RunConfig, TrackingConfig, flat_params, parse_overrides, parse_yaml
from vqlab.errors import UserError
from vqlab.runfolder import RunFolder
from vqlab.runtime import git_commit
from vqlab.schema import ConfigError
from vqlab.tracking import (
    MlflowRun,
    client,
    create_run,
    experiment_id,
    mlflow_uri,
    progress_postfix,
    search_all,
)

PRESETS = resources.files("vqlab") / "configs" / "sweeps"
KEYS = ("name", "base", "notebook", "overrides", "variants", "grid", "seeds", "controls", "scales")
CONTROLS = ("identity",)  # the quantizers a sweep's ``controls`` may name: continuous, of any width
SUBMITIT_TIMEOUT_MIN = 24 * 60  # a submitit job's time limit unless --submitit timeout_min=... gives one
TRACEBACK_LINES = 40  # the tail of a failing cell's traceback kept on its MLflow run
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class SweepError(UserError, ValueError):
    """A sweep file, or one of its variants, is invalid; ``key`` is the dotted config key when
    a variant's config is what is wrong."""

    def __init__(self, message: str, key: str = ""):
        self.key = key
        super().__init__(message)


# --- the sweep file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One run of the sweep: a variant, or one seed of a variant when the sweep gives seeds."""

    name: str  # the variant's name (its ``variant`` tag), the same for each of its seeds
    overrides: dict[str, Any]  # every dotted override the notebook receives
    cfg: RunConfig
    seed: int | None = None  # the sweep's seed of this run (its ``seed`` tag); None: the sweep gives none
    floor: str = ""  # the variant that is this one's continuous floor (its ``floor`` tag); empty: none
    control: bool = False  # a floor the sweep's ``controls`` added or named (its ``control`` tag)

    @property
    def label(self) -> str:
        """``<variant>``, or ``<variant>/seed<k>``: the run's folder under the sweep's and its MLflow run name."""
        return self.name if self.seed is None else f"{self.name}/seed{self.seed}"

    @property
    def key(self) -> tuple[str, str | None]:
        """The run's ``variant`` and ``seed`` tags (``None``: no seed tag), what a rerun matches."""
        return self.name, None if self.seed is None else str(self.seed)

    @property
    def run(self) -> RunFolder:
        return RunFolder.of(self.cfg)


@dataclass(frozen=True)
class Sweep:
    name: str  # the experiment: the sweep's name, with the scale when the file names scales
    base: str  # a preset name or an absolute config path
    notebook: Path
    variants: list[Variant] = field(default_factory=list)  # every run: each variant once per seed
    seeds: list[int] | None = None  # None: one run per variant, its seed the base's


def sweep_presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def read_file(source: str) -> tuple[dict[str, Any], Path | None]:
    """A sweep preset's or file's mapping, and the folder a relative ``base`` is read from."""
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise SweepError(f"sweep file {source} does not exist")
        text, folder = path.read_text(), path.resolve().parent
    else:
        preset = PRESETS / f"{source}.yaml"
        if not preset.is_file():
            raise SweepError(f"unknown sweep {source!r}; presets: {', '.join(sweep_presets())}, or a .yaml file")
        text, folder = preset.read_text(), None
    try:
        data = parse_yaml(text, source)
    except ConfigError as err:
        raise SweepError(str(err), err.key) from None
    if not isinstance(data, dict):
        raise SweepError(f"{source} must hold a mapping with name, base and variants or grid")
    return data, folder


def mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{key} must be a mapping, got {type(value).__name__}")
    return value


def grid_points(grid: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``{"train.dtype": ["fp32", "bf16"]}`` -> ``[("dtype=fp32", {...}), ("dtype=bf16", {...})]``."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key} must be a non-empty list of values")
    points = []
    for values in itertools.product(*grid.values()) if grid else ():
        pairs = dict(zip(grid, values, strict=True))
        label = ",".join(f"{key.rsplit('.', 1)[-1]}={value_label(v)}" for key, v in pairs.items())
        points.append((label, pairs))
    return points


def value_label(value: Any) -> str:
    return "-".join(map(str, value)) if isinstance(value, list) else str(value)


def variant_overrides(
    data: dict[str, Any], scale: str | None, grid: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """Each variant's own overrides: the named variants crossed with the grid points. A variant's
    key naming a scale (config keys are dotted, scale names are not) holds overrides of that scale."""
    named = mapping(data, "variants")
    scales = mapping(data, "scales")
    for name, overrides in named.items():
        if not isinstance(overrides, dict):
            raise SweepError(f"variant {name}: its overrides must be a mapping of dotted keys")
        stray = sorted(k for k in overrides if "." not in k and k not in scales)
        if stray:
            raise SweepError(f"variant {name}: {stray[0]!r} is neither a dotted config key nor a scale", stray[0])
    points = grid_points(grid)
    if not named and not points:
        raise SweepError("a sweep needs variants or a grid")
    variants = []
    for (name, given), (label, pairs) in itertools.product(named.items() or [("", {})], points or [("", {})]):
        own = {k: v for k, v in given.items() if "." in k} | (mapping(given, scale) if scale in given else {})
        both = sorted(own.keys() & pairs.keys())
        if both:
            raise SweepError(f"variant {name}: {', '.join(both)} given by both the variant and the grid", both[0])
        variants.append((",".join(p for p in (str(name), label) if p), {**own, **pairs}))
    return variants


def check_controls(value: Any) -> list[str]:
    """A sweep file's ``controls``: one name of ``CONTROLS``, or a list of them."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or any(name not in CONTROLS for name in names):
        raise SweepError(f"controls must name a continuous control ({', '.join(CONTROLS)}); got {value!r}", "controls")
    return names


def latent_width(base: str, overrides: dict[str, Any], variant: str) -> int:
    """The width of the tokens a variant's quantizer takes (``quantizer.dim``), from its config."""
    from vqlab import quantizers

    cfg = notebook.build_config(base, overrides, "width", "width", smoke=False)
    try:
        return quantizers.build(cfg.quantizer).dim
    except Exception as err:
        raise SweepError(f"variant {variant}: its quantizer does not build: {err}", "quantizer") from None


def with_controls(
    named: list[tuple[str, dict[str, Any]]], controls: list[str], base: str
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str], set[str]]:
    """The sweep's variants with their floors added: every variant, then each floor not among them;
    the floor of each quantized variant by name; and the names of the floors."""
    floors: dict[str, str] = {}
    added: dict[str, dict[str, Any]] = {}
    for control in controls:
        for variant, overrides in named:
            if overrides.get("quantizer.name") == control:
                continue  # a control itself has no floor
            recipe = {k: v for k, v in overrides.items() if not k.startswith("quantizer.")}
            width = latent_width(base, overrides, variant)
            floor = recipe | {"quantizer.name": control, "quantizer.dim": width}
            same = [name for name, given in [*named, *added.items()] if given == floor]
            if not same:
                name = f"{control}-d{width}"
                name = name if name not in added and name not in dict(named) else f"{name}-{variant}"
                added[name] = floor
                same = [name]
            floors[variant] = same[0]
    return [*named, *added.items()], floors, set(floors.values())


def check_seeds(value: Any, key: str) -> list[int]:
    """A sweep file's ``seeds``: a non-empty list of distinct non-negative integers (not bools)."""
    if not isinstance(value, list) or not value or any(type(s) is not int or s < 0 for s in value):
        raise SweepError(f"{key} must be a non-empty list of non-negative integers, e.g. [0, 1, 2]; got {value!r}", key)
    if (again := repeated_seed(value)) is not None:
        raise SweepError(f"{key} repeats seed {again}: {value}", key)
    return value


def repeated_seed(seeds: list[int]) -> int | None:
    """The first seed that occurs twice, or ``None``."""
    return next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]``; anything but distinct non-negative integers is an error."""
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", item) for item in items):
        raise SweepError(
            f"--seeds {text!r}: give distinct non-negative integers separated by commas, e.g. --seeds 0,1,2"
        )
    seeds = [int(item) for item in items]
    if (again := repeated_seed(seeds)) is not None:
        raise SweepError(f"--seeds {text}: repeats seed {again}")
    return seeds


def load(
    source: str,
    scale: str | None = None,
    extra: dict[str, Any] | None = None,
    smoke: bool = False,
    seeds: list[int] | None = None,
) -> Sweep:
    """Read a sweep and build every run's config (``extra``: overrides of every variant, last):
    each variant once per seed of ``seeds`` (``--seeds``), else of the scale's or the file's
    ``seeds``, else once; the first invalid variant is a ``SweepError`` naming it and the key."""
    data, folder = read_file(source)
    unknown = sorted(data.keys() - set(KEYS))
    if unknown:
        raise SweepError(f"unknown key {unknown[0]!r} in sweep {source}; known: {', '.join(KEYS)}", unknown[0])
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise SweepError(f"sweep {source}: name must be letters, digits, '_', '.' or '-', got {name!r}", "name")
    scales = mapping(data, "scales")
    if scale is not None and scale not in scales:
        raise SweepError(f"sweep {name} has no scale {scale!r}; scales: {', '.join(scales) or 'none'}", "scales")
    scale = scale or next(iter(scales), None)
    chosen = dict(mapping(scales, scale) if scale else {})
    base = chosen.pop("base", data.get("base"))
    grid = mapping({"grid": chosen.pop("grid", data.get("grid"))}, "grid")
    given = {"--seeds": seeds} if seeds is not None else {}
    if "seeds" in chosen:
        given.setdefault(f"scales.{scale}.seeds", check_seeds(chosen.pop("seeds"), f"scales.{scale}.seeds"))
    if "seeds" in data:
        given.setdefault("seeds", check_seeds(data["seeds"], "seeds"))
    seeds_from, seeds = next(iter(given.items()), ("", None))  # --seeds, else the scale's, else the file's
    if not isinstance(base, str) or not base:
        raise SweepError(f"sweep {name}: base must name a preset or a config file", "base")
    if folder is not None and (folder / base).is_file():
        base = str(folder / base)
    experiment = f"{name}-{scale}" if scale else name
    common = {**mapping(data, "overrides"), **chosen}
    named = []
    for variant, own in variant_overrides(data, scale, grid):
        overrides = {**common, **own}
        if smoke:  # the point of --smoke: a scale's or a variant's budget (the demo's 400 steps) must not undo it
            overrides = {key: value for key, value in overrides.items() if key not in notebook.SMOKE}
        overrides |= extra or {}
        if seeds is not None and "train.seed" in overrides:
            setters = {"the command line": extra or {}, "the variant or the grid": own, "the sweep's overrides": common}
            by = next(setter for setter, given in setters.items() if "train.seed" in given)
            raise SweepError(
                f"variant {variant}: train.seed is set by {by} and by {seeds_from} ({','.join(map(str, seeds))}); "
                "give the seeds one way",
                "train.seed",
            )
        named.append((variant, overrides))
    floors, controls = {}, set()
    if data.get("controls") is not None:
        named, floors, controls = with_controls(named, check_controls(data["controls"]), base)
    variants = []
    for seed in seeds or [None]:  # seed by seed: the first seed of every variant runs first
        for variant, overrides in named:
            run_name = variant if seed is None else f"seed{seed}"
            if seed is not None:
                overrides = {**overrides, "train.seed": seed, "tracking.run_group": variant}
            try:
                cfg = notebook.build_config(base, overrides, experiment, run_name, smoke=smoke)
                overrides |= recorded(cfg.tracking)
                cfg = notebook.build_config(base, overrides, experiment, run_name, smoke=smoke)
            except ConfigError as err:
                raise SweepError(f"variant {variant}: {err}", err.key) from None
            variants.append(Variant(variant, overrides, cfg, seed, floors.get(variant, ""), variant in controls))
    return Sweep(experiment, base, Path(data.get("notebook") or notebook.NOTEBOOK), variants, seeds)


def recorded(tracking: TrackingConfig) -> dict[str, Any]:
    """Every variant records in MLflow, in the store this process resolves, under an absolute root,
    so a notebook kernel or a submitit job elsewhere writes where the driver looks."""
    root = str(Path(tracking.root).resolve())
    uri = mlflow_uri(replace(tracking, root=root))
    return {"tracking.root": root, "tracking.mlflow": True, "tracking.mlflow_uri": uri}


def check_data(sweep: Sweep) -> None:
    """The data folders every variant reads exist: a missing one stops the sweep before it runs."""
    for variant in sweep.variants:
        data = variant.cfg.data
        for key, folder in (("data.root", data.root), ("data.val_root", data.val_root)):
            if folder and data.name == "imagefolder" and not Path(folder).is_dir():
                raise SweepError(f"variant {variant.name}: {key}: {folder} is not a folder", key)


def select(variants: list[Variant], patterns: str | None) -> list[Variant]:
    """``--variants``: the runs of the variants whose names match one of the comma-separated shell
    patterns (``fnmatch``, e.g. ``'*_10bit'``), with the continuous floors they are read against;
    every run without patterns. A pattern that matches no variant is an error naming the variants."""
    if patterns is None:
        return variants
    wanted = [pattern for pattern in patterns.split(",") if pattern]
    names = list(dict.fromkeys(v.name for v in variants))
    for pattern in wanted or [patterns]:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise SweepError(f"--variants {pattern!r} matches no variant; variants: {', '.join(names)}")
    chosen = {v.name for v in variants if any(fnmatchcase(v.name, pattern) for pattern in wanted)}
    chosen |= {v.floor for v in variants if v.name in chosen and v.floor}
    return [v for v in variants if v.name in chosen]


def shard(variants: list[Variant], spec: str | None) -> list[Variant]:
    """``"k/n"``: every n-th run (variant, or variant and seed) from the k-th (1-based), so n
    shards partition the sweep's runs."""
    if spec is None:
        return variants
    match = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise SweepError(f"--shard {spec}: give k/n with 1 <= k <= n, e.g. 1/4")
    k, n = int(match.group(1)), int(match.group(2))
    return variants[k - 1 :: n]


# --- MLflow ------------------------------------------------------------------------------------
class Tracker:
    """The sweep's MLflow records: its parent run and what is known of each variant."""

    def __init__(self, sweep: Sweep):
        tracking = sweep.variants[0].cfg.tracking
        self.tracking = tracking
        self.client = client(tracking)
        self.experiment = experiment_id(self.client, tracking)
        self.sweep = sweep.name
        self.commit = git_commit()

    def search(self, query: str) -> list:
        """Every run of this sweep matching ``query``, oldest first: all pages (one holds 1000 runs)."""
        return search_all(self.client, self.experiment, f"tags.sweep = '{self.sweep}' and {query}", ["start_time ASC"])

    def parent(self) -> str:
        """The sweep's parent run: the oldest one any machine made (so shards that start together
        end up sharing one), or a new one."""
        found = self.search("tags.sweep_parent = 'true'")
        if found:
            return found[0].info.run_id
        tags = {"sweep": self.sweep, "sweep_parent": "true", "git_commit": self.commit}
        made = create_run(self.tracking, self.sweep, tags, mlflow_client=self.client).run_id
        oldest = self.search("tags.sweep_parent = 'true'")[0].info.run_id
        if oldest != made:
            self.client.delete_run(made)
        return oldest

    def finished(self) -> set[tuple[str, str | None]]:
        """The ``Variant.key`` (variant and seed tags) of every run whose MLflow run FINISHED."""
        return {
            (run.data.tags["variant"], run.data.tags.get("seed"))
            for run in self.search("attributes.status = 'FINISHED'")
            if "variant" in run.data.tags
        }

    def attempts(self, variant: Variant) -> list[str]:
        """The run ids of every MLflow run of ``variant`` (its ``variant`` and ``seed`` tags) in this sweep."""
        return [
            run.info.run_id
            for run in self.search(f"tags.variant = '{variant.name}'")
            if (run.data.tags.get("variant"), run.data.tags.get("seed")) == variant.key
        ]

    def tags(self, variant: Variant) -> dict[str, str]:
        """The run's MLflow tags: ``variant`` its variant's name, and ``seed`` the sweep's seed of it."""
        seed = {} if variant.seed is None else {"seed": str(variant.seed)}
        floor = {"floor": variant.floor} if variant.floor else {}
        control = {"control": "true"} if variant.control else {}
        return {
            "sweep": self.sweep,
            "variant": variant.name,
            **seed,
            **floor,
            **control,
            "git_commit": self.commit,
            "mlflow.source.git.commit": self.commit,
        }


# --- reusing another experiment's runs ------------------------------------------------------------
# The tags that say where a run stands in its sweep: a reused run takes this sweep's, not its source's.
PLACE_TAGS = ("sweep", "sweep_parent", "variant", "seed", "floor", "control", "error", "vqlab.run_dir")


def recipe(cfg: RunConfig) -> str:
    """What a run's numbers depend on in its config: all of it but where the run is kept and named
    (``tracking``), as canonical text two configs are compared by."""
    fields = asdict(cfg)
    fields.pop("tracking")
    return json.dumps(fields, sort_keys=True, default=str)


@dataclass(frozen=True)
class Reusable:
    """A finished run of another experiment that trained a planned run's recipe."""

    experiment: str
    run: Any  # its ``mlflow.entities.Run``
    folder: RunFolder


def reusable(tracker: Tracker, experiments: list[str], variants: list[Variant]) -> dict[str, Reusable]:
    """``Variant.label -> Reusable`` for each of ``variants`` whose recipe a FINISHED run of one of
    ``experiments`` (this store; the first that has one) trained: its run folder, on this machine,
    finished and recording that MLflow run. A run whose folder's config cannot be read (an older
    schema) is passed over. ``SweepError`` naming an experiment the store does not hold."""
    wanted = {}
    for variant in variants:
        wanted.setdefault(recipe(variant.cfg), []).append(variant)
    found: dict[str, Reusable] = {}
    for name in experiments:
        experiment = tracker.client.get_experiment_by_name(name)
        if experiment is None:
            raise SweepError(f"--reuse {name}: no MLflow experiment of that name in {mlflow_uri(tracker.tracking)}")
        for run in search_all(tracker.client, experiment.experiment_id, "attributes.status = 'FINISHED'"):
            if not run.data.tags.get("vqlab.run_dir"):
                continue
            folder = RunFolder(run.data.tags["vqlab.run_dir"])
            try:
                if folder.mlflow_run_id() != run.info.run_id or not folder.is_finished():
                    continue
                made = recipe(folder.read_config())
            except (UserError, OSError, ValueError):
                continue
            for variant in wanted.get(made, []):
                if folder.path.resolve() != variant.run.path.resolve():
                    found.setdefault(variant.label, Reusable(name, run, folder))
    return found


def reuse(tracker: Tracker, job: Job, source: Reusable) -> None:
    """Make ``job``'s run a copy of ``source``: an MLflow run nested under the sweep with this run's
    tags and ``tracking`` params, and the source's other params, metric histories, artifacts, times
    and own tags (commit, threads, CPU: what made the numbers), tagged ``vqlab.reused_from``
    (``<experiment>/<run name>``) and ``vqlab.reused_run_id``; its folder the source's, copied, with
    this run's config. Every earlier attempt of the run in this sweep is deleted (a copy keeps the
    source's start time, and the report takes a run's newest). On an error nothing of the copy is
    left, so the run trains as without ``--reuse``; a kill leaves at most an unfinished MLflow run,
    which a rerun replaces."""
    from mlflow.exceptions import MlflowException

    variant, run = job.variant, job.variant.run
    run.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in run.path.parent.glob(f".reusing-{run.path.name}-*"):  # what a kill left
        shutil.rmtree(stale, ignore_errors=True)
    # hidden, and named like no variant: a kill while copying leaves no half run folder
    staging = Path(tempfile.mkdtemp(prefix=f".reusing-{run.path.name}-", dir=run.path.parent))
    commits = ("git_commit", "mlflow.source.git.commit")  # the source's only: its code made the numbers
    own = {k: v for k, v in source.run.data.tags.items() if k not in PLACE_TAGS and not k.startswith("mlflow.")}
    tags = {k: v for k, v in job.tags.items() if k not in commits} | own
    tags |= {k: source.run.data.tags[k] for k in commits if k in source.run.data.tags}
    tags |= {"vqlab.reused_from": f"{source.experiment}/{source.run.info.run_name}"}
    tags |= {"vqlab.reused_run_id": source.run.info.run_id, "vqlab.run_dir": str(run.path.resolve())}
    copy, placed = None, False
    try:
        shutil.copytree(source.folder.path, staging, dirs_exist_ok=True)
        # the source's MLflow run is no earlier attempt of this one (``start_run`` deletes those)
        RunFolder(staging).mlflow_id_file.unlink(missing_ok=True)
        RunFolder(staging).write_config(variant.cfg)
        start = source.run.info.start_time
        copy = create_run(variant.cfg.tracking, variant.label, tags, None, job.parent_run_id, tracker.client, start)
        copy.copy_from(source.run, skip_params="tracking.")
        copy.log_params({k: v for k, v in flat_params(variant.cfg).items() if k.startswith("tracking.")})
        for earlier in tracker.attempts(variant):
            if earlier != copy.run_id:
                tracker.client.delete_run(earlier)
        shutil.rmtree(run.path, ignore_errors=True)
        placed = True
        staging.rename(run.path)
        run.set_mlflow_run_id(copy.run_id)
        copy.end("FINISHED", source.run.info.end_time)
    except BaseException:
        if copy is not None:
            with contextlib.suppress(MlflowException):
                tracker.client.delete_run(copy.run_id)
        if placed:  # a finished folder without its run would pass for trained
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- one variant ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """Everything one run's execution needs, picklable (a submitit job receives it)."""

    variant: Variant
    base: str
    notebook: Path
    parent_run_id: str
    tags: dict[str, str]
    nproc: int
    smoke: bool
    cwd: Path


@dataclass(frozen=True)
class Outcome:
    variant: str  # the run's label: ``<variant>`` or ``<variant>/seed<k>``
    error: str = ""  # empty: the notebook ran to the end

    @property
    def ok(self) -> bool:
        return not self.error


def describe(err: BaseException) -> tuple[str, str]:
    """A one-line summary and the text kept on the FAILED run: papermill's failing cell, error and
    the tail of its traceback, or the exception that stopped the execution itself."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        lines = ANSI.sub("", "\n".join(err.traceback)).splitlines()[-TRACEBACK_LINES:]
        summary = f"{err.ename}: {err.evalue}"
        text = f"cell {err.cell_index} (In [{err.exec_count}]):\n{err.source}\n\n{summary}\n\n" + "\n".join(lines)
        return summary, text
    summary = f"{type(err).__name__}: {err}"
    return summary, summary


def variant_run(job: Job) -> MlflowRun:
    """The MLflow run recorded in the variant's folder (training makes it), or a new one nested under
    the sweep when there is none in this store (the execution failed before training started)."""
    from mlflow.exceptions import MlflowException

    run, tracking = job.variant.run, job.variant.cfg.tracking
    mlflow_client = client(tracking)
    run_id = run.mlflow_run_id()
    if run_id is not None:
        try:
            mlflow_client.get_run(run_id)
            return MlflowRun(mlflow_client, run_id)
        except MlflowException:
            pass  # recorded in another store
    return create_run(tracking, job.variant.label, job.tags, run, job.parent_run_id, mlflow_client)


def run_job(job: Job) -> Outcome:
    """Execute the notebook for one variant and give its MLflow run the notebook's outcome:
    FINISHED, or FAILED with the error attached (a run made here if training made none)."""
    variant, run = job.variant, job.variant.run
    from mlflow.exceptions import MlflowException

    run.path.mkdir(parents=True, exist_ok=True)
    # no bar in the notebook (each refresh would be an output of its own): its run ends on one line,
    # and the sweep's terminal shows the steps (``RunProgress``)
    overrides = {**variant.overrides, "tracking.tags": job.tags, "tracking.progress": False}
    parameters = {
        "preset": job.base,
        "overrides": overrides,
        "experiment": variant.cfg.tracking.experiment,
        "run_name": variant.cfg.tracking.run_name,
        "parent_run_id": job.parent_run_id,
        "nproc": job.nproc,
        "smoke": job.smoke,
    }
    summary = text = ""
    try:
        notebook.execute(parameters, run.notebook, job.notebook, job.cwd)
    except Exception as err:  # any failure of this variant is recorded on its run; the sweep goes on
        summary, text = describe(err)
    mlflow_run = variant_run(job)
    if run.notebook.is_file():
        mlflow_run.artifact(run.notebook)
    if summary:
        mlflow_run.set_tag("error", summary[:5000])
        mlflow_run.client.log_text(mlflow_run.run_id, text, "error.txt")
    else:  # a run finished by an earlier attempt whose notebook failed after training
        with contextlib.suppress(MlflowException):
            mlflow_run.client.delete_tag(mlflow_run.run_id, "error")
    mlflow_run.end("FAILED" if summary else "FINISHED")
    return Outcome(variant.label, summary)


# --- launchers -----------------------------------------------------------------------------------
def unit(jobs: list[Job]) -> str:
    return "run" if any(job.variant.seed is not None for job in jobs) else "variant"


class RunProgress:
    """The running run's steps, loss and images/s on a second bar below the sweep's, read from its
    ``metrics.jsonl`` every ``every`` seconds: the training's own output goes into its notebook,
    and a person watching the terminal would otherwise see nothing move for minutes."""

    def __init__(self, variant: Variant, every: float = 2.0):
        self.run = variant.run
        self.every = every
        self.bar = tqdm(total=variant.cfg.train.steps, desc=variant.label, unit="step", position=1, leave=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def poll(self) -> None:
        """Show the newest training row of the run's records."""
        rows = [row for row in self.run.read_metrics() if "train/loss" in row]
        if not rows:
            return
        latest = rows[-1]
        # the first row seen, or records a resume cut back to its checkpoint (the file is rewritten):
        # the rate and ETA count from the step the run (re)started at, never negative
        if self.bar.n == 0 or latest["step"] < self.bar.n:
            self.bar.reset()
            self.bar.initial = latest["step"]
        self.bar.n = latest["step"]
        self.bar.set_postfix(progress_postfix(latest))

    def watch(self) -> None:
        while not self.stop.wait(self.every):
            with contextlib.suppress(OSError, ValueError):  # the file is being replaced or written
                self.poll()

    def __enter__(self) -> RunProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.bar.close()


def run_local(jobs: list[Job], sweep: str) -> list[Outcome]:
    outcomes = []
    bar = tqdm(jobs, desc=sweep, unit=unit(jobs), dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.variant.label)
        with RunProgress(job.variant):
            outcomes.append(run_job(job))
        failed = sum(not o.ok for o in outcomes)
        if failed:
            bar.set_postfix_str(f"{job.variant.label}, {failed} failed")
    bar.close()
    return outcomes


def run_submitit(
    jobs: list[Job], sweep: str, folder: Path, cluster: str | None, options: dict[str, Any]
) -> list[Outcome]:
    """One submitit job per run, a variant or a variant's seed (Slurm through ``AutoExecutor``, or
    its ``local``/``debug`` executors); a run's ``nproc`` GPUs go to the job, whose notebook runs
    torchrun over them."""
    import submitit

    # submitit's own time limits (2 minutes on its local executor, 5 on Slurm) would kill a run of the
    # default recipe (~5 minutes on 2 CPU cores) as it trains; a day unless --submitit timeout_min says
    options = {"timeout_min": SUBMITIT_TIMEOUT_MIN, **options}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    submitted = []
    for job in jobs:
        gpus = 0 if job.variant.cfg.train.device == "cpu" else job.nproc
        name = f"{sweep}-{job.variant.label.replace('/', '-')}"
        executor.update_parameters(name=name, gpus_per_node=gpus, tasks_per_node=1, **options)
        submitted.append((job, executor.submit(run_job, job)))
    outcomes = []
    bar = tqdm(total=len(submitted), desc=sweep, unit=unit(jobs), dynamic_ncols=True)
    pending = list(submitted)
    while pending:
        for job, handle in [p for p in pending if p[1].done()]:
            pending.remove((job, handle))
            try:
                outcomes.append(handle.result())
            except Exception as err:  # the job itself died (killed, out of time): its run failed
                outcomes.append(Outcome(job.variant.label, describe(err)[0]))
            bar.update()
        time.sleep(0.5 if pending else 0)
    bar.close()
    return outcomes


# --- command line --------------------------------------------------------------------------------
def listing(sweep: Sweep, variants: list[Variant]) -> str:
    what = "variants"
    if sweep.seeds is not None:
        names = len({v.name for v in sweep.variants})
        what = f"runs ({names} variants x seeds {','.join(map(str, sweep.seeds))})"
    rows = [f"{len(variants)} of {len(sweep.variants)} {what} of {sweep.name} (base {sweep.base}):"]
    width = max((len(v.label) for v in variants), default=0)
    for v in variants:
        own = " ".join(f"{k}={val}" for k, val in v.overrides.items() if not k.startswith("tracking."))
        role = f"  [floor: {v.floor}]" if v.floor else "  [control]" if v.control else ""
        rows.append(f"  {v.label:<{width}}  {v.run.path}  {own}{role}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqlab.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help=f"a sweep file or a preset ({', '.join(sweep_presets())})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every variant")
    parser.add_argument("--scale", help="one of the sweep's scales (default: its first)")
    parser.add_argument(
        "--seeds", metavar="0,1,2", help="run every variant once per seed (train.seed), in place of the file's seeds"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs (variant, seed) and their run folders; run nothing"
    )
    parser.add_argument(
        "--variants",
        metavar="PATTERN[,PATTERN]",
        help="only the variants whose names match a shell pattern, e.g. '*_10bit', with their continuous floors",
    )
    parser.add_argument("--shard", metavar="k/n", help="run every n-th run (variant, seed) from the k-th (1-based)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per variant, to check the sweep end to end")
    parser.add_argument(
        "--reuse",
        metavar="EXPERIMENT[,EXPERIMENT]",
        help="copy, instead of training, each run whose recipe (its config but tracking) a finished run of "
        "these experiments trained, e.g. another sweep's continuous floors",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes (GPUs) per variant; > 1 trains through torchrun"
    )
    parser.add_argument("--launcher", choices=("local", "submitit"), default="local")
    parser.add_argument("--cluster", help="submitit's cluster: slurm (default where sbatch exists), local or debug")
    parser.add_argument(
        "--submitit",
        action="append",
        default=[],
        metavar="key=value",
        help="a submitit parameter (repeatable), e.g. --submitit timeout_min=600 --submitit slurm_partition=gpu",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        if args.nproc < 1:
            raise SweepError(f"--nproc must be >= 1, got {args.nproc}")
        seeds = None if args.seeds is None else parse_seeds(args.seeds)
        sweep = load(args.sweep, args.scale, parse_overrides(args.overrides), args.smoke, seeds)
        chosen = shard(select(sweep.variants, args.variants), args.shard)
        if args.dry_run:  # reads nothing and writes nothing, MLflow included
            print(listing(sweep, chosen))
            return 0
        check_data(sweep)
        options = parse_overrides(args.submitit)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tracker = Tracker(sweep)
    finished = tracker.finished()
    todo = [v for v in chosen if v.key not in finished]
    if len(todo) < len(chosen):
        skipped = len(chosen) - len(todo)
        what = ("variant" if sweep.seeds is None else "run") + ("s" if skipped > 1 else "")
        what += "" if sweep.seeds is None else " (variant, seed)"
        print(f"skipping {skipped} finished {what} of {sweep.name}", file=sys.stderr)
    try:
        sources = reusable(tracker, [e for e in args.reuse.split(",") if e], todo) if args.reuse else {}
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parent = tracker.parent()
    jobs = [
        Job(v, sweep.base, sweep.notebook.resolve(), parent, tracker.tags(v), args.nproc, args.smoke, Path.cwd())
        for v in todo
    ]
    reused = set()
    for job in [j for j in jobs if j.variant.label in sources]:
        source = sources[job.variant.label]
        try:
            reuse(tracker, job, source)
        except Exception as err:  # the run is trained instead, as without --reuse
            print(f"could not reuse {job.variant.label} ({type(err).__name__}: {err}); training it", file=sys.stderr)
            continue
        reused.add(job.variant.label)
        print(f"reused {job.variant.label}: {source.experiment}/{source.run.info.run_name}", file=sys.stderr)
    jobs = [j for j in jobs if j.variant.label not in reused]
    if args.launcher == "submitit":
        folder = Path(sweep.variants[0].cfg.tracking.root) / sweep.name / "submitit"
        outcomes = run_submitit(jobs, sweep.name, folder, args.cluster, options)
    else:
        outcomes = run_local(jobs, sweep.name)
    failures = [o for o in outcomes if not o.ok]
    tracker.client.set_terminated(parent, status="FAILED" if failures else "FINISHED")
    done = len(outcomes) - len(failures)
    copied = f", {len(reused)} reused" if reused else ""
    print(f"sweep {sweep.name}: {done} finished{copied}, {len(failures)} failed; mlflow {mlflow_uri(tracker.tracking)}")
    failed = {failure.variant for failure in failures}
    for variant in chosen:
        if variant.label not in failed:
            print(f"  {variant.label}: {variant.run.notebook}")
    for failure in failures:
        print(f"failed: {failure.variant}: {failure.error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
