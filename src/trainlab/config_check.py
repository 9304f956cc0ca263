"""Step 1 of a run: check the composed config before anything is built or tracked.

The schemas below are typed dataclasses, one per config node trainlab reads itself; each
field's ``metadata`` says what is allowed. Hydra's structured configs stop at the first
bad value and cannot express ranges, so :func:`check_config` walks these schemas itself and
reports every problem of a config at once, one line each: the key, the value, what is
allowed. Component nodes (those with a ``_target_``) are also checked for keys their
constructor does not take. Checking a component imports its target; the
hardware check imports torch: nothing here reads data or touches MLflow.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from trainlab.errors import TrainlabError
from trainlab.tracker import LOG_MODEL

Check = Callable[[Any], bool]


def spec(kind: str, check: Check, optional: bool = False) -> Any:
    """A schema field: ``kind`` is how the error names what is allowed; ``check`` accepts a
    value; ``optional`` also allows null."""
    return field(default=None, metadata={"kind": kind, "check": check, "optional": optional})


def _int(low: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(above: float | None = None, at_least: float | None = None) -> Check:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (above is None or v > above) and (at_least is None or v >= at_least)

    return check


def _one_of(*choices: str) -> Check:
    return lambda v: v in choices


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _size(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(1)(x) for x in v)


def _devices(v: Any) -> bool:
    if v == "auto" or _int(1)(v):
        return True
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(0)(x) for x in v)


BOOL = ("true or false", _is_bool)


@dataclass
class RootSchema:
    seed: int = spec("an integer", _int(-(2**63)))


@dataclass
class TrainerSchema:
    max_epochs: int = spec("an integer >= 1", _int(1))
    accelerator: str = spec("one of auto, cpu, cuda, mps", _one_of("auto", "cpu", "cuda", "mps"))
    devices: Any = spec("auto, a number >= 1, or a list of GPU indices like [0,2]", _devices)
    monitor: str = spec("a metric name like val/acc", _text)
    monitor_mode: str = spec("min or max", _one_of("min", "max"))
    deterministic: bool = spec(*BOOL)
    progress_bar: bool = spec(*BOOL)
    accumulate_grad_batches: int = spec("an integer >= 1", _int(1))
    gradient_clip_val: float = spec("a number > 0, or null for no clipping", _number(above=0),
                                    optional=True)
    sync_batchnorm: bool = spec(*BOOL)
    detect_anomaly: bool = spec(*BOOL)
    resume: str = spec("a checkpoint path, last, an MLflow run id, or null",
                       lambda v: _text(v) or _int(0)(v), optional=True)  # ids of digits: int
    checkpoint_every_n_steps: int = spec("an integer >= 1, or null (epoch ends only)", _int(1),
                                         optional=True)
    checkpoint_every_n_minutes: float = spec("a number > 0, or null (epoch ends only)",
                                             _number(above=0), optional=True)
    save_top_k: int = spec("an integer >= 1, or null (last.pt and best.pt only)", _int(1),
                           optional=True)
    top_k: int = spec("an integer >= 2, or null for no top-k accuracy", _int(2), optional=True)


@dataclass
class EarlyStoppingSchema:
    patience: int = spec("an integer >= 1, or null for no early stopping", _int(1), optional=True)


@dataclass
class DataSchema:
    task: str = spec("classification or segmentation", _one_of("classification", "segmentation"))
    num_classes: int = spec("an integer >= 1, or null to infer it from the data", _int(1),
                            optional=True)
    in_channels: int = spec("an integer >= 1", _int(1))
    image_size: Sequence[int] = spec("[height, width], integers >= 1", _size)
    batch_size: int = spec("an integer >= 1", _int(1))
    num_workers: int = spec("an integer >= 0", _int(0))
    pin_memory: bool = spec(*BOOL)
    persistent_workers: bool = spec(*BOOL)
    drop_last: bool = spec(*BOOL)
    ignore_index: int = spec("an integer label, or null", _int(-(2**31)), optional=True)


@dataclass
class OptimizerSchema:
    lr: float = spec("a number > 0", _number(above=0))
    weight_decay: float = spec("a number >= 0", _number(at_least=0))
    head_lr: float = spec("a number > 0, or null", _number(above=0), optional=True)
    layer_decay: float = spec("a number in (0, 1], or null", _number(above=0), optional=True)


@dataclass
class MlflowLoggerSchema:
    tracking_uri: str = spec("a URI (sqlite:///mlflow.db, http://host:5000) or null", _text,
                             optional=True)
    experiment_name: str = spec("a non-empty string (quote digits: '\"123\"')", _text)
    log_every_n_steps: int = spec("an integer >= 1", _int(1))
    log_model: str = spec(f"one of {', '.join(LOG_MODEL)} (true and false mean all and none)",
                          lambda v: isinstance(v, bool) or v in LOG_MODEL)
    log_checkpoints: bool = spec(*BOOL)
    flush_every_s: float = spec("a number >= 0", _number(at_least=0))
    log_system_metrics: bool = spec(*BOOL)
    system_metrics_every_s: float = spec("a number > 0", _number(above=0))


@dataclass
class DebugSchema:
    train_batches: int = spec("an integer >= 1, or null", _int(1), optional=True)
    val_batches: int = spec("an integer >= 1, or null", _int(1), optional=True)
    overfit_batches: int = spec("an integer >= 1, or null", _int(1), optional=True)
    profile: bool = spec(*BOOL)


@dataclass
class PrecisionSchema:
    mode: str = spec("fp32, bf16 or fp16", _one_of("fp32", "bf16", "fp16"))
    tf32: bool = spec(*BOOL)


def _freeze(v: Any) -> bool:
    if v in ("none", "backbone"):
        return True
    return isinstance(v, (list, tuple)) and all(_text(pattern) for pattern in v)


@dataclass
class FinetuneSchema:
    """conf/finetune.yaml, which every model config includes."""

    weights_path: str = spec("a file path, or null", _text, optional=True)
    freeze: Any = spec("none, backbone, or a list of name patterns like [conv1.*, layer1.*]",
                       _freeze, optional=True)
    freeze_bn: bool = spec(*BOOL)
    unfreeze_at_epoch: int = spec("an integer >= 1 (epochs trained frozen), or null",
                                  _int(1), optional=True)
    head: Any = spec("null, or a new head like {hidden: 256, dropout: 0.5}",
                     lambda v: isinstance(v, dict), optional=True)
    channels_last: bool = spec(*BOOL)
    compile: bool = spec(*BOOL)


# config path → schema; only keys present in the config are checked (options differ).
SCHEMAS: dict[str, type] = {
    "": RootSchema,
    "trainer": TrainerSchema,
    "trainer.early_stopping": EarlyStoppingSchema,
    "data": DataSchema,
    "optimizer": OptimizerSchema,
    "logger": MlflowLoggerSchema,
    "precision": PrecisionSchema,
    "debug": DebugSchema,
    "model": FinetuneSchema,
}

# Component nodes: config path → (config group, the keys trainlab reads itself before
# building it — named where they are read —, constructor arguments the code passes itself
# and the YAML must not set).
COMPONENTS: dict[str, tuple[str, str | tuple[str, ...], tuple[str, ...]]] = {
    "trainer": ("trainer", "trainlab.runner.NOT_LOOP_KEYS",
                ("model", "loss", "optimizer", "train_loader", "val_loader", "tracker",
                 "checkpoint_dir", "precision", "scheduler", "metrics", "device")),
    "logger": ("logger", (), ()),
    "optimizer": ("optimizer", "trainlab.optim.OUR_KEYS", ("params",)),
    "scheduler": ("scheduler", ("interval",), ("optimizer",)),
    "loss": ("loss", (), ()),
    "precision": ("precision", (), ()),
    "data.dataset": ("data", (), ()),
    "model": ("model", "trainlab.models.finetune.FINETUNE_KEYS", ()),
}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(TrainlabError):
    """Every problem of a config, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value with interpolations resolved and containers made plain)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node.keys():
        return False, None
    if OmegaConf.is_missing(node, leaf):
        return True, "???"
    value = node[leaf]
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return True, value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and value == "" else str(value)


def schema_problems(cfg: DictConfig) -> list[str]:
    """Values of the known keys that break their schema."""
    problems = []
    for path, schema in SCHEMAS.items():
        if path and OmegaConf.select(cfg, path) is None:
            continue  # e.g. no logger node with logger=none
        for item in dataclasses.fields(schema):
            key = f"{path}.{item.name}" if path else item.name
            try:
                present, value = _value(cfg, key)
            except OmegaConfBaseException as err:  # ??? left unset, a broken ${...}
                problems.append(f"{key}: {str(err).splitlines()[0]}")
                continue
            if not present or (value is None and item.metadata["optional"]):
                continue
            if value == "???":
                problems.append(f"{key}=???: not set; give {key}=..., {item.metadata['kind']}")
            elif value is None or not item.metadata["check"](value):
                problems.append(f"{key}={_show(value)}: must be {item.metadata['kind']}")
    return problems


def unknown_key_problems(cfg: DictConfig, choices: dict) -> list[str]:
    """Keys under a component that neither its constructor nor trainlab reads."""
    from hydra.utils import get_object

    problems = []
    for path, (group, ours, given) in COMPONENTS.items():
        node = OmegaConf.select(cfg, path)
        if not isinstance(node, DictConfig) or not node.get("_target_"):
            continue
        ours = get_object(ours) if isinstance(ours, str) else ours
        try:
            target = get_object(node._target_)
            parameters = inspect.signature(target).parameters.values()
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # building it names the bad _target_ (components.build)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            continue
        accepted = {p.name for p in parameters} - set(given)
        unknown = sorted(set(node) - HYDRA_KEYS - accepted - set(ours))
        where = f"conf/{group}/{choices[group]}.yaml" if choices.get(group) else group
        for key in unknown:
            problems.append(
                f"{path}.{key}: not a setting of {node._target_} ({where}); accepted: "
                + ", ".join(sorted((accepted | set(ours)) - {"self"}))
            )
    return problems


# sections whose keys trainlab reads by name (not passed to a constructor): a key added to
# one with ``+`` is read by nothing
CLOSED_SECTIONS = ("", "data", "debug", "paths", "trainer.early_stopping")


def added_key_problems(cfg: DictConfig, overrides: Sequence[str]) -> list[str]:
    """``+data.batchsize=3`` (after Hydra said data has no such key) would train as if never
    typed: a key added to a section trainlab reads by name is refused, with the keys it has.
    Components are checked against their constructors instead; ``+group=option`` appends
    a config group."""
    problems = []
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override_key(override)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if parent not in CLOSED_SECTIONS or "/" in key or not isinstance(node, DictConfig):
            continue
        if parent in SCHEMAS and leaf in {f.name for f in fields(SCHEMAS[parent])}:
            continue  # read when present (data.ignore_index on a source without one)
        if not parent and not isinstance(node.get(leaf), (int, float, str, bool, type(None))):
            continue  # a config group appended at the top (+experiment=…, +debug=fast)
        where = parent or "the config's top level"
        problems.append(f"{key}: not a setting trainlab reads (added with +); {where} has: "
                        + ", ".join(sorted(k for k in node if k != leaf)))
    return problems


def _fp16_on_cpu(cfg: DictConfig) -> str:
    return (
        f"precision.mode=fp16 (precision=fp16) needs a GPU (float16 autocast with loss "
        f"scaling) but trainer.accelerator={cfg.trainer.accelerator} runs on the CPU; use "
        "precision=bf16, which autocasts on the CPU too"
    )


def stated_hardware_problems(cfg: DictConfig) -> list[str]:
    """Hardware misfits the config states outright (``fp16`` with ``trainer.accelerator=cpu``):
    decided without importing torch, so they answer within a second."""
    fp16 = OmegaConf.select(cfg, "precision.mode") == "fp16"
    return [_fp16_on_cpu(cfg)] if fp16 and cfg.trainer.accelerator == "cpu" else []


def hardware_problems(cfg: DictConfig) -> list[str]:
    """Hardware the config asks for and this machine lacks (fp16 without a GPU, CUDA
    indices that are not visible). Imports torch; run once the values are well typed."""
    from trainlab.distributed import plan_launch

    try:
        launch = plan_launch(cfg.trainer.accelerator, cfg.trainer.devices)
    except TrainlabError as err:
        return [str(err)]
    if OmegaConf.select(cfg, "precision.mode") == "fp16" and launch.device_type == "cpu":
        return [_fp16_on_cpu(cfg)]
    return []


def unset_problems(cfg: DictConfig, reported: Sequence[str]) -> list[str]:
    """Mandatory values (``???``) left unset anywhere, unless a schema already named them."""
    return [
        f"{key}=???: not set; give {key}=... on the command line"
        for key in sorted(OmegaConf.missing_keys(cfg))
        if not any(line.startswith(f"{key}=") for line in reported)
    ]


def relation_problems(cfg: DictConfig, reported: Sequence[str]) -> list[str]:
    """Values each fine alone that do not fit together, once neither was reported."""
    unfreeze = OmegaConf.select(cfg, "model.unfreeze_at_epoch")
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if any(line.startswith(("model.unfreeze_at_epoch=", "trainer.max_epochs="))
           for line in reported) or unfreeze is None or not isinstance(epochs, int):
        return []
    if unfreeze < epochs:
        return []
    allowed = f"an epoch from 1 to {epochs - 1}" if epochs > 1 else "null (one epoch trains frozen)"
    return [f"model.unfreeze_at_epoch={unfreeze}: the layers would unfreeze after the last epoch "
            f"(trainer.max_epochs={epochs}); choose {allowed}"]


def check_config(cfg: DictConfig, choices: dict, hardware: bool = True,
                 overrides: Sequence[str] = ()) -> None:
    """Raise a :class:`ConfigError` listing every problem of ``cfg`` (composed with
    ``overrides``); return when none. ``hardware=False`` leaves out what this machine lacks
    (for a command that trains nothing)."""
    problems = schema_problems(cfg) + added_key_problems(cfg, overrides)
    problems += unset_problems(cfg, problems)
    problems += relation_problems(cfg, problems)
    typed = hardware and not any(p.startswith(("trainer.", "precision.")) for p in problems)
    if typed and (stated := stated_hardware_problems(cfg)):
        # answered before the component imports (torch, mlflow: seconds); the keys of the
        # components are checked on the next try, once the hardware fits
        raise ConfigError(problems + stated)
    problems += unknown_key_problems(cfg, choices)
    if typed:
        problems += hardware_problems(cfg)
    if problems:
        raise ConfigError(problems)


RESUME_KEYS = ("trainer.resume", "trainer.resume_as")
RESUME_COMMAND_TAG = "trainlab.resume_command"  # a resumed run's last resume, as typed


def override_key(override: str) -> str:
    """``optimizer.lr`` of ``+optimizer.lr=0.1`` (and of ``~optimizer.lr``)."""
    return override.lstrip("+~").partition("=")[0]


def resume_as_typed(cfg: DictConfig, overrides: list[str]) -> None:
    """``trainer.resume`` as the command line gave it: Hydra reads a run-id prefix of digits
    or like ``8e123456`` as a number (dropping leading zeros, or making it ``inf``)."""
    if isinstance(cfg.trainer.get("resume"), (int, float)):
        for override in overrides:
            key, _, raw = override.lstrip("+").partition("=")
            if key == "trainer.resume":
                with open_dict(cfg):
                    cfg.trainer.resume = raw.strip("'\"")
