"""``srmodels`` / ``python -m srmodels``: pin the CPU instruction set (``--cpu-isa``) before torch loads, then
run the command line (``srmodels.cli``)."""
from __future__ import annotations

import sys

from srmodels.core import isa
from srmodels.core.errors import UserError


def _cpu_isa(argv: list[str]) -> str:
    """The ``--cpu-isa`` value, read ahead of argparse (which runs after torch has loaded); native if absent."""
    for i, arg in enumerate(argv):
        if arg == "--cpu-isa" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--cpu-isa="):
            return arg.split("=", 1)[1]
    return isa.NATIVE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    level = _cpu_isa(argv)
    if level in isa.CHOICES:  # an invalid value is argparse's to report, with the valid ones
        try:
            isa.pin(level, source="--cpu-isa")
        except UserError as err:
            print(f"srmodels: error: {err}", file=sys.stderr)
            return 2
    from srmodels.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
