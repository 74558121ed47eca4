"""Console scripts of the package: ``zoo-train``, ``zoo-test``, ``zoo-infer``, ``zoo-export``,
``zoo-convert``.

Each runs ``zoo.cli.<command>.main()`` on the command line (the same flags as ``tools/<command>.py``)
and exits with status 0 on success. A command's ``main`` returns its result (metrics, written paths)
to Python callers; a console script would otherwise hand that to ``sys.exit``, which prints it and
exits with status 1.
"""
import importlib


def exit_status(result) -> int:
    """A command's return value as an exit status: an int is one, anything else means success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _run(command: str) -> int:
    return exit_status(importlib.import_module(f"zoo.cli.{command}").main())


def train() -> int:
    return _run("train")


def test() -> int:
    return _run("test")


def infer() -> int:
    return _run("infer")


def export() -> int:
    return _run("export")


def convert() -> int:
    return _run("convert")
