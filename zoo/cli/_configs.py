"""The shipped mmengine configs: where they are, their names, and ``CONFIG`` argument lookup.

A wheel installs the repository's configs/ folder as ``zoo/configs`` (package data); a source
checkout or editable install uses configs/ beside zoo/. A config's *name* is its file name without
``.py`` (``quickstart_digits``, ``biformer_tiny_digits``); files and folders starting with ``_``
(``_base_/``, ``_digits_common.py``) are building blocks, not names.
"""
import argparse
import difflib
import os.path as osp
from pathlib import Path
from typing import Dict, List

__all__ = ["config_root", "config_names", "resolve_config", "ListConfigsAction"]


def config_root() -> Path:
    """The folder holding the shipped configs (installed package data, else the checkout's configs/)."""
    package = Path(__file__).resolve().parents[1]
    for root in (package / "configs", package.parent / "configs"):
        if root.is_dir():
            return root
    raise FileNotFoundError(f"no configs folder next to {package} (looked for zoo/configs and ../configs)")


def config_names() -> Dict[str, Path]:
    """{name: file} for every shipped config, sorted by name."""
    root = config_root()
    found: Dict[str, List[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith("_") for part in rel.parts):
            continue
        found.setdefault(path.stem, []).append(path)
    names = {}
    for stem, paths in found.items():
        if len(paths) == 1:
            names[stem] = paths[0]
        else:  # the same file name in two folders: only the folder-qualified names are unambiguous
            for path in paths:
                names[path.relative_to(root).with_suffix("").as_posix()] = path
    return dict(sorted(names.items()))


def resolve_config(config: str) -> str:
    """Path of ``config``: an existing file, a config name, or a path inside the shipped configs/
    (``configs/biformer/biformer_tiny_digits.py`` works from any directory)."""
    if osp.isfile(config):
        return config
    root = config_root()
    rel = config[len("configs/"):] if config.startswith("configs/") else config
    candidate = root / rel
    if rel.endswith(".py") and candidate.is_file():
        return str(candidate)
    names = config_names()
    key = rel[:-3] if rel.endswith(".py") else rel
    if key in names:
        return str(names[key])
    close = difflib.get_close_matches(osp.basename(key), list(names), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"config {config!r} is neither a file nor a shipped config name{hint} "
                            "(--list-configs shows the names)")


def format_listing() -> str:
    root = config_root()
    names = config_names()
    width = max((len(n) for n in names), default=0)
    lines = [f"{name:<{width}}  {path.relative_to(root).as_posix()}" for name, path in names.items()]
    return "\n".join([f"{len(names)} configs in {root}:"] + lines)


class ListConfigsAction(argparse.Action):
    """``--list-configs``: print the shipped config names and exit (like ``--version``)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "list the shipped config names (usable as CONFIG) and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_listing())
        parser.exit()
