"""The command line's surface: flags per command, how many have help, how many plain
``--help`` shows, and the README's length. Run it against another checkout to compare::

    python benchmarks/cli_surface.py                       # this checkout
    PYTHONPATH=OTHER/src python benchmarks/cli_surface.py --root OTHER
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from sharelora import cli


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args()
    full = "show_all" in inspect.signature(cli.build_parser).parameters
    every = cli.build_parser(True) if full else cli.build_parser()
    plain = cli.build_parser()
    subs = every._subparsers._group_actions[0].choices
    plain_subs = plain._subparsers._group_actions[0].choices
    print("| command | flags | with help | shown by --help |")
    print("|---|---:|---:|---:|")
    for name, sub in subs.items():
        flags = _flags(sub)
        helped = [a for a in flags if a.help and a.help != argparse.SUPPRESS]
        shown = [a for a in _flags(plain_subs[name]) if a.help != argparse.SUPPRESS]
        print(f"| {name} | {len(flags)} | {len(helped)} | {len(shown)} |")
    readme = Path(args.root) / "README.md"
    print(f"\nREADME.md: {len(readme.read_text().splitlines())} lines")


if __name__ == "__main__":
    main()
