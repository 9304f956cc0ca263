"""`trainlab init DIR`: a starter project beside the installed trainlab.

It writes ``conf/`` (a dataset, a model, two losses and an experiment using them), a Python
package with their code (named after DIR), a README of the commands that matter and a
``.gitignore`` for outputs and the tracking store. Run trainlab in DIR and ``./conf`` joins
the config search path, its code importable (see trainlab.app).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from importlib.resources import files
from pathlib import Path

from trainlab.errors import TrainlabError

TEMPLATE_PACKAGE = "starter"  # the template's package name, replaced by the project's
RENAMED = {"gitignore": ".gitignore"}  # dotfiles are stored without their dot


def package_name(folder: Path) -> str:
    """A Python package name from a folder name (``My-Project`` → ``my_project``)."""
    name = re.sub(r"\W+", "_", folder.resolve().name).strip("_").lower() or "project"
    return f"project_{name}" if name[0].isdigit() else name


def template_files():
    """``(relative path, template file)`` of every file of the starter project."""
    root = files("trainlab.templates") / "project"

    def walk(node, prefix: str):
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.name == "__pycache__":
                continue
            if child.is_dir():
                yield from walk(child, f"{prefix}{child.name}/")
            else:
                yield f"{prefix}{child.name}", child

    return list(walk(root, ""))


def init_project(folder: Path, package: str | None = None, force: bool = False) -> list[Path]:
    """Write the starter project into ``folder``; returns the files written."""
    package = package or package_name(folder)
    if not package.isidentifier():
        raise TrainlabError(f"--package {package!r} is not a Python package name")
    if importlib.util.find_spec(package) is not None:
        raise TrainlabError(f"a module named {package!r} is already importable here; "
                            "choose another name with --package NAME")
    plan = []
    for relative, source in template_files():
        parts = [RENAMED.get(p, package if p == TEMPLATE_PACKAGE else p)
                 for p in relative.split("/")]
        plan.append((folder.joinpath(*parts), source))
    existing = [str(target) for target, _ in plan if target.exists()]
    if existing and not force:
        raise TrainlabError(f"{folder} already has {', '.join(existing)}; "
                            "use --force to overwrite")
    pattern = re.compile(rf"\b{TEMPLATE_PACKAGE}\b")
    for target, source in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(pattern.sub(package, source.read_text(encoding="utf-8")),
                          encoding="utf-8")
    return [target for target, _ in plan]


def init_cli(args: list[str]) -> int:
    """`trainlab init DIR [--package NAME] [--force]`."""
    parser = argparse.ArgumentParser(
        prog="trainlab init",
        description="Write a starter project: your own data, model, losses and an experiment.",
    )
    parser.add_argument("folder", type=Path, help="where to create it (made if missing)")
    parser.add_argument("--package", help="its Python package (default: from the folder name)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    options = parser.parse_args(args)
    try:
        written = init_project(options.folder, options.package, options.force)
    except TrainlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files into {options.folder}/. Next:\n"
          f"  cd {options.folder}\n"
          "  trainlab train experiment=stripes\n"
          "  trainlab ui")
    return 0
