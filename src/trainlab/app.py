"""The Hydra app plumbing every config-driven command shares: where the configs live and how
a ``@hydra.main`` function is called with a command's arguments.

Configs are looked up in this order, the first file found wins (so a user's
``conf/loss/ce.yaml`` replaces the shipped one, and ``conf/loss/mine.yaml`` adds an option):

1. ``--config-dir DIR`` given to the command (repeatable);
2. ``$TRAINLAB_CONFIG_DIR`` (one or more folders, separated like PATH);
3. ``./conf`` in the working directory;
4. the configs shipped with trainlab (``CONFIG_DIR``).

A config folder's ``experiment`` group also reads the ``experiments/`` folder beside it (the
layout of this repository and of `trainlab init` projects), and the folder holding a user's
config folder is importable, so ``_target_: mypackage.losses.soft_ce`` finds the user's code.
`trainlab train --info searchpath` prints the resulting list.

Kept free of torch and mlflow so `trainlab COMMAND --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

# FileConfigSource is Hydra's own reader of a config folder; ProjectConfigSource extends it.
from hydra._internal.core_plugins.file_config_source import FileConfigSource  # isort: skip

_HERE = Path(__file__).resolve().parent
# An installed wheel carries the configs inside the package; a clone has them at its root.
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parents[1] / "conf")
CONFIG_DIR_ENV = "TRAINLAB_CONFIG_DIR"
CONFIG_DIRS_TAG = "trainlab.config_dirs"  # a run's --config-dir folders, for its command
SCHEME = "trainlab"
EXPERIMENT_GROUP = "experiment"


def user_config_dirs() -> list[Path]:
    """The user's config folders, highest priority first (``$TRAINLAB_CONFIG_DIR``, ./conf)."""
    listed = [Path(p) for p in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if p]
    dirs = [*listed, Path("conf")]
    seen, found = {Path(CONFIG_DIR).resolve()}, []
    for folder in dirs:
        resolved = folder.resolve()
        if resolved.is_dir() and resolved not in seen:
            seen.add(resolved)
            found.append(resolved)
    return found


def given_config_dirs() -> list[str]:
    """The folders ``--config-dir`` / ``$TRAINLAB_CONFIG_DIR`` name (not ./conf), absolute:
    a command repeated in another folder needs them named again."""
    listed = os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep)
    return list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in listed if p))


def config_dir_args(dirs: list[str]) -> list[str]:
    """``--config-dir DIR`` for each of ``dirs``."""
    return [arg for folder in dirs for arg in ("--config-dir", folder)]


def config_groups() -> set[str]:
    """The config group names on the search path (``model``, ``experiment``, the user's …)."""
    folders = [Path(CONFIG_DIR), *user_config_dirs()]
    names = {child.name for folder in folders for child in folder.iterdir() if child.is_dir()}
    return names | {EXPERIMENT_GROUP}


def take_config_dirs(args: list[str]) -> list[str]:
    """Move ``--config-dir DIR`` / ``-cd DIR`` from ``args`` into ``$TRAINLAB_CONFIG_DIR``.

    Hydra's own flag would search the folder after the shipped configs; here it comes first,
    and the variable carries it to sweep and DDP worker processes.
    """
    rest, dirs, items = [], [], iter(args)
    for arg in items:
        flag, sep, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if sep else next(items, "")
            folder = Path(value).expanduser().resolve()
            if not folder.is_dir():
                print(f"error: --config-dir {value!r}: no such folder", file=sys.stderr)
                raise SystemExit(2)
            dirs.append(str(folder))
        else:
            rest.append(arg)
    if dirs:
        previous = os.environ.get(CONFIG_DIR_ENV)
        os.environ[CONFIG_DIR_ENV] = os.pathsep.join([*dirs, *([previous] if previous else [])])
    return rest


def make_user_code_importable() -> None:
    """Put the folder holding each user config folder on the import path (and on PYTHONPATH
    for worker processes), so their ``_target_`` modules import without setup."""
    roots = [str(folder.parent) for folder in user_config_dirs()]
    for root in reversed(roots):
        if root not in sys.path:
            sys.path.insert(0, root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    missing = [root for root in roots if root not in paths]
    if missing:
        os.environ["PYTHONPATH"] = os.pathsep.join([*missing, *filter(None, paths)])


def run_hydra_app(app, name: str, args: list[str]) -> int:
    """Call a ``@hydra.main`` function with ``args`` as its command line, on the shared
    config search path. A misspelt group option is one line naming the close ones (Hydra
    prints a page: every option, the search path, a hint about stack traces)."""
    args = take_config_dirs(args)
    make_user_code_importable()
    problems = unknown_options([arg for arg in args if not arg.startswith("-")])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    sys.argv = [f"trainlab-{name}", *args]
    app()
    return 0


def unknown_options(overrides: list[str]) -> list[str]:
    """``group=option`` overrides whose option is found nowhere on the config search path,
    each as one line with the close names and every option of the group. Sweep lists
    (``loss=ce,dice``) are the sweep check's."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = config_groups()
    chosen = [(group, option) for group, _, option in
              (override.lstrip("+").partition("=") for override in overrides)
              if group in groups and option not in ("", "null") and not set(option) & set(",()[]")]
    if not chosen:
        return []
    problems = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group, option in chosen:
            options = loader.get_group_options(group)
            if option in options:
                continue
            problems.append(option_problem(group, option, options))
    return problems


def option_problem(group: str, option: str, options: list[str]) -> str:
    """One line for a group option that does not exist: the close names, then them all."""
    from difflib import get_close_matches

    close = get_close_matches(option, options, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"{group}={option}: no {group}/{option}.yaml on the config search path; "
            f"{hint}{group} options: {', '.join(options)}")


def composition_problem(err) -> str:
    """A config Hydra cannot compose (a misspelt ``model=nosuch``, an unknown key) as one
    line, naming the options there are."""
    group, _, option = (getattr(err, "missing_cfg_file", None) or "").rpartition("/")
    if group and getattr(err, "options", None):
        return option_problem(group, option, list(err.options))
    return " ".join(str(err).split())


def compose(config_name: str = "train", overrides: list[str] | tuple[str, ...] = ()):
    """The config ``trainlab train overrides…`` would run (without Hydra's own keys), on the
    same search path, running nothing: for tools that need a config outside a Hydra app.
    A group option found nowhere on the path is refused in one line (Hydra itself drops an
    optional group's, ``experiment=NAME``, without a word)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from trainlab.errors import TrainlabError

    make_user_code_importable()
    problems = unknown_options(list(overrides))
    if problems:
        raise TrainlabError("\n".join(problems))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return hydra_compose(config_name, overrides=list(overrides))
        except ConfigCompositionException as err:
            raise TrainlabError(composition_problem(err)) from None


class ProjectConfigSource(FileConfigSource):
    """A config folder (``trainlab://DIR``) whose ``experiment`` group also holds the
    ``*.yaml`` files of the ``experiments/`` folder beside it."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _experiments(self, config_path: str) -> Path | None:
        """``experiment/x.yaml`` → ``<DIR>/../experiments/x.yaml`` (None outside the group)."""
        group, _, rest = config_path.strip("/").partition("/")
        if group != EXPERIMENT_GROUP:
            return None
        return Path(self.path).parent / "experiments" / rest

    def load_config(self, config_path: str) -> ConfigResult:
        if super().is_config(config_path):
            return super().load_config(config_path)
        outside = self._experiments(self._normalize_file_name(config_path))
        source = FileConfigSource(self.provider, str(outside.parent))
        result = source.load_config(outside.name)
        result.path = f"{SCHEME}://{self.path}"
        return result

    def is_group(self, config_path: str) -> bool:
        outside = self._experiments(config_path)
        return super().is_group(config_path) or (outside is not None and outside.is_dir())

    def is_config(self, config_path: str) -> bool:
        outside = self._experiments(self._normalize_file_name(config_path))
        return super().is_config(config_path) or (outside is not None and outside.is_file())

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        found = super().list(config_path, results_filter) if super().is_group(
            config_path) else []
        outside = self._experiments(config_path)
        if outside is not None and outside.is_dir():
            for file in os.listdir(outside):
                self._list_add_result(files=found, file_path=f"{config_path}/{file}",
                                      file_name=file, results_filter=results_filter)
        elif config_path == "" and self.is_group(EXPERIMENT_GROUP):
            if results_filter in (None, ObjectType.GROUP):
                found.append(EXPERIMENT_GROUP)
        return sorted(set(found))


class ProjectSearchPath(SearchPathPlugin):
    """Puts the user's config folders before the shipped ones in trainlab's apps (and leaves
    every other Hydra app alone)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        entries = search_path.get_path()
        main = next((e for e in entries if e.provider == "main"), None)
        if main is None or main.path.removeprefix("file://") != CONFIG_DIR:
            return
        main.path = f"{SCHEME}://{CONFIG_DIR}"
        for folder in user_config_dirs():  # each goes right before the shipped configs
            search_path.prepend("trainlab-user", f"{SCHEME}://{folder}",
                                anchor=SearchPathQuery(provider="main"))
