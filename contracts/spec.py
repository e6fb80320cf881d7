"""The experiment spec: the one contract every layer reads.

`publish` builds it from options, a search expands into it, the queue carries it as JSON, the
trainer runs it, W&B logs it as config and the run dir saves it. It imports nothing heavier than
pydantic, so publishing never pays for torch.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import json
import re
import socket
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from contracts.loss_formula import format_loss, parse_loss
from contracts.plugins import AUGMENTATIONS, DATASETS, LOSSES, OPTIMIZERS, SCHEDULERS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

RELABELS = ("none", "default")  # or a path to a corrections .csv (see trainer/relabel.py)

# Names the seed's scripts used, accepted so its configs keep working; keys are lower case with
# "_" and "-" removed.
ALIASES: dict[str, dict[str, str]] = {
    "loss": {"ce": "cross_entropy", "crossentropy": "cross_entropy"},
    "augmentation": {
        "baseaugmentation": "base",
        "customaugmentation": "custom",
        "imgaugaugmentation": "imgaug",
    },
    # MaskBaseDataset split by image, which put one person's photos on both sides and inflated
    # validation F1; it maps to the profile split on purpose (DESIGN.md), so its runs score honestly.
    "dataset": {
        "maskbasedataset": "mask",
        "masksplitbyprofiledataset": "mask",
        "imagefolder": "image_folder",
    },
}

# Fields that say where or how a run is scheduled, not what it computes: they stay out of the hash.
NON_RESULT_FIELDS = frozenset(
    {
        "run_name",
        "queue",
        "priority",
        "wandb",
        "output_dir",
        "num_workers",
        "device",
        "eval_dir",
        "pictures",
        "min_batch_size",
        "image_cache",
        "compile",
        # It changes what is trained only when files are broken, and then the result counts them.
        "bad_images",
    }
)

# The fields ExperimentSpec's model validators read (_default_min_batch_size, _consistent): every
# other field is validated on its own value only. A search checks values of these fields together
# (schedule_search.point_specs); a new cross-field check must add its fields here.
CROSS_FIELD_CHECKS = frozenset(
    {"dataset", "heads", "relabel", "warmup_epochs", "epochs", "batch_size", "min_batch_size"}
)

# Problems one error message lists: a file of 100,000 unknown keys gets 20 lines, not 72 MB.
MAX_ERROR_LINES = 20

SECRET_WORDS = ("key", "token", "password", "passwd", "secret")
# Values that carry a secret: a password inside a URL, or an API-key-like token (W&B keys are 40 hex).
SECRET_VALUE_PATTERNS = (
    (re.compile(r"://[^/@\s:]*:[^/@\s]+@"), "a password inside a URL"),
    (re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{40,}(?![0-9a-fA-F])"), "an API-key-like token"),
)


class SpecError(ValueError):
    """A spec failed validation; the message names each bad field and how to fix it."""

    def __init__(self, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.fields = fields or []


@lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    """Names timm registers, read from the list shipped with runyard (no torch import)."""
    text = resources.files("contracts").joinpath("timm_models.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def check_model_name(name: str) -> str:
    """Accept a timm architecture name, optionally with a pretrained tag (`efficientnet_b2.ra_in1k`)."""
    architecture = name.split(".", 1)[0]
    known = timm_model_names()
    if architecture in known:
        return name
    close = difflib.get_close_matches(architecture, known, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()` for the names"
    raise ValueError(f"unknown timm model {name!r}{hint}")


def reject_secret(value: Any) -> Any:
    """Refuse a string that carries a secret: specs travel through Redis and W&B in clear text."""
    if isinstance(value, str):
        for pattern, what in SECRET_VALUE_PATTERNS:
            if pattern.search(value):
                raise ValueError(
                    f"looks like it holds {what}, and secrets never go in a spec or into Redis: "
                    "give credentials to the workers through their environment (e.g. WANDB_API_KEY)"
                )
    return value


# Spec fields whose value names a plug-in: checked (and aliases resolved) against its name table.
NAMED_CHOICES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "augmentation": AUGMENTATIONS, "dataset": DATASETS}


def _canonical_choice(field: str, value: Any, choices: tuple[str, ...]) -> Any:
    if not isinstance(value, str):
        return value
    key = value.strip().lower()
    compact = key.replace("_", "").replace("-", "")
    key = ALIASES.get(field, {}).get(compact, key)
    if key not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose one of: {', '.join(choices)}")
    return key


class WandbSettings(BaseModel):
    """Where W&B files the run. The API key is never here: workers read WANDB_API_KEY."""

    model_config = ConfigDict(extra="forbid")

    project: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None  # WANDB_PROJECT, else "runyard"
    entity: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None
    group: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None
    tags: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=20)] = []

    @field_validator("project", "entity", "group")
    @classmethod
    def _no_secret_names(cls, value: str | None) -> str | None:
        return reject_secret(value)

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [tag.strip() for tag in value.split(",") if tag.strip()]
        return value

    @field_validator("tags")
    @classmethod
    def _no_secret_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            reject_secret(tag)
        return value


class KFold(BaseModel):
    """Cross-validation: with k >= 2 the run trains fold `fold` of a k-fold split grouped by profile."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(1, ge=1, le=20, description="number of folds; 1 = a single train/val split by val_ratio")
    fold: int = Field(0, ge=0, le=19, description="which fold this run holds out (0-based)")

    @model_validator(mode="after")
    def _fold_in_range(self) -> KFold:
        if self.k > 1 and self.fold >= self.k:
            raise ValueError(f"fold {self.fold} does not exist with k={self.k}; use 0..{self.k - 1}")
        return self


class HeadWeights(BaseModel):
    """Loss weights of the three heads of a multi-head model (`heads: multi`)."""

    model_config = ConfigDict(extra="forbid")

    mask: float = Field(1.0, ge=0, le=100, description="multi heads: loss weight of the mask head")
    gender: float = Field(1.0, ge=0, le=100, description="multi heads: loss weight of the gender head")
    age: float = Field(1.0, ge=0, le=100, description="multi heads: loss weight of the age head")

    @model_validator(mode="after")
    def _not_all_zero(self) -> HeadWeights:
        if self.mask == self.gender == self.age == 0:
            raise ValueError("at least one head weight must be above 0")
        return self


class ExperimentSpec(BaseModel):
    """One experiment: model, data, optimisation and where its results go.

    Defaults are the seed pipeline's (`train.py` of the mask-status baseline), except that the
    validation split is by profile: images of one person never sit in both train and val.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # What is trained
    model: str = Field("efficientnet_b2", description="timm model name (any of timm.list_models())")
    pretrained: bool = Field(True, description="start from timm's pretrained weights")
    loss: str = Field(
        "cross_entropy", description=f"one of {', '.join(LOSSES)}, or a weighted sum like 0.6*focal+0.4*f1"
    )
    focal_gamma: float = Field(2.0, ge=0, le=10, description="focal loss: the gamma of (1 - p) ** gamma")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label_smoothing loss: the smoothing")
    class_weights: Literal["none", "inverse_frequency"] = Field(
        "none", description="weigh each class's loss by N / (classes x its train count); not used by f1"
    )
    heads: Literal["single", "multi"] = Field(
        "single", description="single: one classifier; multi: mask, gender, age heads on one backbone (mask data)"
    )
    head_weights: HeadWeights = Field(default_factory=HeadWeights)

    # Optimisation
    optimizer: str = Field("adam", description=f"one of {', '.join(OPTIMIZERS)}")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    scheduler: str = Field("step", description=f"learning-rate schedule: {', '.join(SCHEDULERS)}")
    lr_decay_step: int = Field(20, ge=1, le=10_000, description="StepLR: epochs between decays")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="StepLR: decay factor")
    epochs: int = Field(1, ge=1, le=1000, description="training epochs")
    batch_size: int = Field(64, ge=1, le=4096, description="training batch size")
    valid_batch_size: int = Field(1000, ge=1, le=8192, description="validation batch size")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="random seed")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    warmup_epochs: int = Field(0, ge=0, le=100, description="linear learning-rate warmup epochs before the schedule")
    grad_clip: float = Field(0.0, ge=0, le=1000, description="clip the gradient norm to this; 0 = off")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="evaluate an EMA of the weights (e.g. 0.999); 0 = off")
    early_stopping_patience: int = Field(
        0, ge=0, le=1000, description="stop after this many epochs without a better val F1; 0 = off"
    )
    deterministic: bool = Field(False, description="deterministic kernels on GPU too (slower); CPU runs always are")
    grad_accum_steps: int = Field(
        1, ge=1, le=1024, description="batches per optimizer step (effective batch = batch_size x this)"
    )
    min_batch_size: int = Field(
        8, ge=1, le=4096, description="on CUDA out of memory the batch is halved (accumulation doubled) down to this"
    )

    # Data
    dataset: str = Field("mask", description=f"data layout: {', '.join(DATASETS)}")
    data_dir: str = Field("data/train", min_length=1, description="training data directory")
    resize: tuple[Annotated[int, Field(ge=8, le=4096)], Annotated[int, Field(ge=8, le=4096)]] = Field(
        (260, 260), description="input size as HEIGHTxWIDTH (one number for a square)"
    )
    augmentation: str = Field("imgaug", description=f"train augmentation: {', '.join(AUGMENTATIONS)}")
    center_crop: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]] | None = Field(
        None, description="centre crop HEIGHTxWIDTH (source pixels) before resizing, train and eval"
    )
    mixup: float = Field(0.0, ge=0, le=10, description="mixup alpha: mix image pairs by Beta(a, a); 0 = off")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix alpha: paste boxes by Beta(a, a); 0 = off")
    balanced_sampler: bool = Field(False, description="draw training images with equal probability per class")
    val_ratio: float = Field(
        0.2, gt=0, lt=1, description="share of profiles held out for validation (kfold.k > 1 uses folds instead)"
    )
    age_threshold: int = Field(60, ge=31, le=100, description="age at which the 'old' class starts")
    relabel: str = Field(
        "none", min_length=1, description="label corrections: none, default (the shipped list) or a .csv path"
    )
    kfold: KFold = Field(default_factory=KFold)
    eval_dir: str | None = Field(
        None, description="eval dir (images/ + info.csv): the job writes submission.csv from its best checkpoint"
    )
    tta: Literal["none", "hflip"] = Field("none", description="test-time augmentation for the submission")
    pictures: bool = Field(
        True, description="save (and log to W&B) the confusion matrix, per-class F1 and a validation grid"
    )
    bad_images: Literal["fail", "skip"] = Field(
        "fail",
        description="an image that cannot be decoded: fail the job naming it, or skip it (logged, counted in the"
        " result)",
    )

    # Where and how it runs (not part of the spec hash)
    run_name: Annotated[str | None, Field(pattern=NAME_PATTERN)] = Field(
        None, description="run name; default {YYMMDDHHMM}_{user}_{model}_{optimizer}_{loss}_..."
    )
    output_dir: str | None = Field(None, description="runs directory; default $RUNYARD_HOME/runs")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when a GPU is visible")
    num_workers: int | None = Field(None, ge=0, le=64, description="DataLoader workers; default from cores")
    image_cache: Literal["none", "memory", "disk"] = Field(
        "memory",
        description="decode each image once: memory (per job), disk (one file per box under $RUNYARD_HOME/cache)"
        " or none",
    )
    compile: bool = Field(False, description="torch.compile the model (minutes of compiling, then faster steps)")
    queue: Annotated[str, Field(pattern=NAME_PATTERN)] = Field("default", description="RQ queue name")
    priority: Literal["high", "normal", "low"] = Field("normal", description="queue priority")
    wandb: WandbSettings = Field(default_factory=WandbSettings)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return format_loss(parse_loss(value, lambda name: _canonical_choice("loss", name, LOSSES)))

    @field_validator("relabel", mode="before")
    @classmethod
    def _relabel_choice(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.lower() in RELABELS:
            return text.lower()
        if not text.lower().endswith(".csv"):
            raise ValueError("use none, default (the shipped corrections) or the path of a corrections .csv file")
        return text

    @field_validator("center_crop", mode="before")
    @classmethod
    def _parse_crop(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
            return None
        return parse_size(value)

    @model_validator(mode="before")
    @classmethod
    def _default_min_batch_size(cls, data: Any) -> Any:
        # The default floor (8) never exceeds the batch a spec asks for: batch_size 4 alone is fine.
        if isinstance(data, dict) and "min_batch_size" not in data:
            batch_size = data.get("batch_size", cls.model_fields["batch_size"].default)
            if isinstance(batch_size, int) and 1 <= batch_size < cls.model_fields["min_batch_size"].default:
                data = data | {"min_batch_size": batch_size}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.dataset != "mask" and self.heads == "multi":
            raise ValueError("heads: multi needs the mask dataset (its mask, gender and age labels)")
        if self.dataset != "mask" and self.relabel != "none":
            raise ValueError("relabel corrects mask-dataset profiles; use relabel: none with image_folder")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})")
        if self.min_batch_size > self.batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) is larger than batch_size ({self.batch_size}): "
                f"out-of-memory halving can only go down; use a min_batch_size of at most {self.batch_size}"
            )
        return self

    @field_validator(*NAMED_CHOICES, mode="before")
    @classmethod
    def _known_choice(cls, value: Any, info: ValidationInfo) -> Any:
        return _canonical_choice(info.field_name, value, NAMED_CHOICES[info.field_name])

    @field_validator("resize", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return parse_size(value)

    @field_validator("data_dir", "output_dir", "run_name", "queue")
    @classmethod
    def _no_secret_paths(cls, value: str | None) -> str | None:
        return reject_secret(value)

    def spec_hash(self) -> str:
        """Stable 12-hex-digit id of what this spec computes (scheduling fields excluded)."""
        payload = self.model_dump(mode="json", exclude=set(NON_RESULT_FIELDS))
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def default_run_name(self, when: datetime | None = None, user: str | None = None) -> str:
        """The seed's naming: {YYMMDDHHMM}_{user}_{model}_{optimizer}_{loss}_{batch}_{aug}_{epochs}."""
        when = when or datetime.now()
        user = re.sub(r"[^A-Za-z0-9-]", "", user or current_user()) or "user"
        model = re.sub(r"[^A-Za-z0-9._-]", "-", self.model)
        loss = re.sub(r"[^A-Za-z0-9._-]+", "-", self.loss)  # 0.6*focal+0.4*f1 -> 0.6-focal-0.4-f1
        return (
            f"{when:%y%m%d%H%M}_{user}_{model}_{self.optimizer}_{loss}"
            f"_{self.batch_size}_{self.augmentation}_{self.epochs}"
        )

    def to_payload(self) -> dict[str, Any]:
        """The JSON-ready dict a queue carries."""
        return self.model_dump(mode="json")


def parse_size(value: Any) -> Any:
    """'260x260', '260,260', 260 or [260, 260] -> (260, 260)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str):
        parts = [part for part in re.split(r"[x, ]+", value.strip().lower()) if part]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"size {value!r} is not HEIGHTxWIDTH, e.g. 260x260")
        return (int(parts[0]), int(parts[1]))
    return value


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return "user"


def current_host() -> str:
    return socket.gethostname().split(".")[0]


def capped_lines(lines: list[str], total: int | None = None) -> str:
    """The first MAX_ERROR_LINES of `lines`, then how many more there are (of `total`, if given)."""
    total = len(lines) if total is None else total
    shown = lines[:MAX_ERROR_LINES]
    if total > len(shown):
        shown.append(f"... and {total - len(shown):,} more problem(s); fix these first")
    return "\n".join(shown)


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, `field: message (got value)`, at most MAX_ERROR_LINES of them."""
    lines = []
    items = error.errors()
    for item in items[:MAX_ERROR_LINES]:
        location = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field; valid fields are: {', '.join(field_names())}"
            close = difflib.get_close_matches(location, field_names(), n=3)
            if close:
                message = f"unknown field; did you mean {', '.join(close)}?"
            if any(word in str(item["loc"][-1]).lower() for word in SECRET_WORDS):
                message = (
                    "looks like a secret, and secrets never go in a spec or into Redis: "
                    "set WANDB_API_KEY (or the like) in the worker's environment instead"
                )
        got = item.get("input")
        hidden = item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) or "secrets never" in message
        shown = "" if hidden else f" (got {got!r})"  # a secret is never echoed back
        lines.append(f"{prefix}{location}: {message}{shown}")
    return capped_lines(lines, len(items))


def field_names(model: type[BaseModel] = ExperimentSpec, prefix: str = "") -> list[str]:
    """Every settable field, nested ones dotted (`wandb.project`)."""
    names = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(field_names(annotation, f"{prefix}{name}."))
        else:
            names.append(f"{prefix}{name}")
    return names


def load_spec(data: dict[str, Any]) -> ExperimentSpec:
    """Validate a dict into a spec, raising SpecError with one readable line per problem."""
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a mapping of field: value, got {type(data).__name__}")
    known = ExperimentSpec.model_fields.keys()  # looked up once: a million lookups of the property take seconds
    unknown = [key for key in data if key not in known]
    if len(unknown) > MAX_ERROR_LINES:
        # Said once, before pydantic lists every one of a million keys with its own line.
        shown = ", ".join(repr(str(key)[:40]) for key in unknown[:MAX_ERROR_LINES])
        raise SpecError(
            f"spec: {len(unknown):,} unknown fields ({shown}, ...); is it the right file? "
            f"valid fields are: {', '.join(field_names())}",
            [str(key) for key in unknown[:MAX_ERROR_LINES]],
        )
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as error:
        fields = [".".join(str(part) for part in item["loc"]) for item in error.errors()[:MAX_ERROR_LINES]]
        raise SpecError(format_validation_error(error), fields) from None
