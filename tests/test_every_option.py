"""Every option of every config group, every experiment and every search preset: it composes,
passes the config check, and its parts build and take one batch (steps 1-2 of a run)."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR
from trainlab.config_check import schema_problems, unknown_key_problems
from trainlab.errors import TrainlabError

GROUPS = ("augment", "data", "model", "loss", "optimizer", "scheduler", "precision", "trainer",
          "logger", "experiment")
SMALL = ["trainer.progress_bar=false", "data.batch_size=8"]
# a small context for the options of each task
CLASSIFY = ["model=mlp"]
SEGMENT = ["data=shapes", "data.image_size=[16,16]", "data.dataset.n_train=16",
           "data.dataset.n_val=8", "model=unet", "model.base_channels=4", "model.depth=2",
           "loss=dice", "trainer.monitor=val/dice"]
# options that need files or hardware this machine lacks: their one-line error
REFUSED = {
    ("data", "cifar10"): "data/cifar-10-batches-py",
    ("data", "fashion_mnist"): "data/FashionMNIST/raw",
    ("data", "mnist"): "data/MNIST/raw",
    ("data", "fashion_mnist_csv"): "fashion-mnist_train.csv",
    ("data", "image_folder"): "data/images",
    ("data", "csv_images"): "data/images",
    ("data", "segmentation_folder"): "data/carvana",
    ("precision", "fp16"): "precision=fp16 needs a GPU",
    ("experiment", "carvana_unet"): "data/carvana",
    ("experiment", "fashion_mnist_cnn"): "data/FashionMNIST/raw",
    ("experiment", "finetune_digits"): "missing.pt does not exist",
}
# what an option leaves for the user to set, and sizes that keep the build quick
EXTRA = {
    ("data", "image_folder"): ["data.num_classes=3"],
    ("data", "csv_images"): ["data.num_classes=3"],
    ("experiment", "finetune_digits"): ["model.weights_path=missing.pt"],
    ("experiment", "shapes_unet_dice"): SEGMENT[1:4],
}


def group_dir(group: str):
    """Experiments live in ``experiments/`` beside the config folder; the rest in ``conf/``."""
    return CONFIG_DIR.parent / "experiments" if group == "experiment" else CONFIG_DIR / group


def options(group: str) -> list[str]:
    return sorted(path.stem for path in group_dir(group).glob("*.yaml"))


CASES = [(group, option) for group in GROUPS for option in options(group)]


def test_the_cases_cover_every_shipped_option():
    """Every group contributes options, the experiment presets included (they live apart)."""
    by_group = {group: options(group) for group in GROUPS}
    assert all(by_group.values()), [g for g, found in by_group.items() if not found]
    assert {"digits_cnn", "shapes_unet_dice", "digits_search"} <= set(by_group["experiment"])
    assert len(CASES) > 60


@pytest.fixture(scope="module")
def compose_once():
    """Compose with Hydra initialised once for the whole module (it is the slow part)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *overrides, **kwargs: compose("train", overrides=list(overrides), **kwargs)


def _compose(compose, group, option, context):
    overrides = [*context, f"{group}={option}", *SMALL, *EXTRA.get((group, option), [])]
    choices = {g: o for g, _, o in (item.partition("=") for item in overrides) if g in GROUPS}
    return compose(*overrides), choices


def _context(group: str) -> list[str]:
    return [] if group == "experiment" else CLASSIFY  # an experiment brings its own


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_passes_the_config_check(compose_once, group, option):
    cfg, choices = _compose(compose_once, group, option, _context(group))
    assert schema_problems(cfg) + unknown_key_problems(cfg, choices) == []
    assert OmegaConf.missing_keys(cfg) == set()


def _prepare(compose, tmp_path, group, option, context):
    from trainlab.tracker import NullTracker
    from trainlab.train import prepare

    cfg, choices = _compose(compose, group, option, context)
    return prepare(cfg, NullTracker(), tmp_path, choices)


@pytest.mark.slow
@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_builds_and_takes_one_batch(compose_once, tmp_path, monkeypatch, group,
                                                 option):
    compose = compose_once
    monkeypatch.chdir(tmp_path)  # relative data roots resolve in an empty folder
    refused = REFUSED.get((group, option))
    if refused:
        with pytest.raises(TrainlabError, match=re.escape(refused)):
            _prepare(compose, tmp_path, group, option, _context(group))
        return
    try:
        prepared = _prepare(compose, tmp_path, group, option, _context(group))
    except TrainlabError as classify_error:  # a segmentation-only option
        try:
            prepared = _prepare(compose, tmp_path, group, option, SEGMENT)
        except TrainlabError as segment_error:
            pytest.fail(f"fits neither task: {classify_error} / {segment_error}")
    assert prepared.runner.optimizer.param_groups
    assert prepared.preview.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_search_preset_sweeps_keys_that_exist(compose_once, search):
    cfg = compose_once(f"hparams_search={search}", return_hydra_config=True)
    cfg_check, choices = _compose(compose_once, "hparams_search", search, CLASSIFY)
    assert schema_problems(cfg_check) + unknown_key_problems(cfg_check, choices) == []
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params
    for key in params:
        if key not in GROUPS:
            assert OmegaConf.select(cfg, key) is not None, f"{search} sweeps {key}, not a key"
        else:
            assert cfg[key] is not None
