"""The command line generated from the config fields (``fields.setting``).

Each flag is named like the field it fills (``--top-layers`` fills ``top_layers``), takes its
default, help, choices and parse from the field, and lands in every config that has a field of
that name (``configs``). Plain ``--help`` lists the essential flags; ``--help-all`` lists every
flag under its group.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, fields

from .config import AdapterConfig, DataConfig, RunConfig, SplitConfig, TrainConfig

# Every config a command's flags can fill, in the order --help-all lists their groups.
CONFIGS = (DataConfig, SplitConfig, AdapterConfig, RunConfig, TrainConfig)
GROUPS = {
    "data": "data",
    "split": "split (per user, seeded)",
    "model": "model",
    "training": "training",
    "personalization": "personalization (the population, the prior, the strength)",
    "scale": "scale and memory",
    "run": "run",
}


def flag_fields(classes=CONFIGS) -> dict[str, Field]:
    """Every field with a flag, by name (a name in two configs is one flag: ``seed``)."""
    out: dict[str, Field] = {}
    for cls in classes:
        for f in fields(cls):
            if f.metadata.get("flag", False):
                out.setdefault(f.name, f)
    return out


def add_fields(
    p: argparse.ArgumentParser,
    classes=CONFIGS,
    *,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
    show_all: bool = False,
    defaults: dict | None = None,
) -> None:
    """Add a flag per field of ``classes`` (``only`` those, less ``exclude``) to ``p``.

    ``defaults`` overrides a field's default for this command (e.g. compare's from_shared).
    Without ``show_all`` the non-essential flags are hidden from ``--help``; they parse alike.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    chosen = [
        (name, f)
        for name, f in flag_fields(classes).items()
        if name not in exclude and (only is None or name in only)
    ]
    order = list(GROUPS)
    for name, f in sorted(chosen, key=lambda item: order.index(item[1].metadata["group"])):
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = p.add_argument_group(GROUPS[meta["group"]])
        default = (defaults or {}).get(name, f.default if f.default is not MISSING else None)
        shown = show_all or meta["essential"]
        kwargs = {"default": default, "dest": name}
        if str(f.type).startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
            text = meta["help"]
        else:
            kwargs["type"] = meta["parse"] or type(f.default)
            kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = meta["metavar"]
            shown_default = "" if default is None else f" (default: {default})"
            text = meta["help"] + shown_default
        kwargs["help"] = text.replace("%", "%%") if shown else argparse.SUPPRESS
        if name in required:
            kwargs["required"] = True
        flag = "--" + name.replace("_", "-")
        action = group.add_argument(flag, *meta["aliases"], **kwargs)
        action.field = f  # what it fills (tests tell field flags from a command's own)


class HelpAll(argparse.Action):
    """``--help-all``: the command's help with every flag shown, grouped."""

    def __init__(self, option_strings, dest, full=None, **kwargs):
        super().__init__(
            option_strings,
            argparse.SUPPRESS,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show every flag, grouped",
        )
        self.full = full

    def __call__(self, parser, namespace, values, option_string=None):
        self.full().print_help()
        parser.exit()


@dataclass
class Configs:
    """Everything one run is told, built from the flags (``configs``)."""

    data: DataConfig
    split: SplitConfig
    adapter: AdapterConfig
    run: RunConfig
    train: TrainConfig


def configs(args: argparse.Namespace, **extra) -> Configs:
    """Every config built from the parsed flags of its field names (``extra`` overrides);
    fields a command has no flag for keep their defaults (or a preset's setting)."""
    values = {**vars(args), **extra}

    def build(cls):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    return Configs(
        *(build(cls) for cls in (DataConfig, SplitConfig, AdapterConfig, RunConfig, TrainConfig))
    )


def reference() -> str:
    """Every field flag as a markdown table by group (docs/guide.md; ``python -m
    sharelora.flags``): what ``train`` takes, with the default and what it does."""
    lines = []
    order = list(GROUPS)
    chosen = sorted(flag_fields().items(), key=lambda item: order.index(item[1].metadata["group"]))
    group = None
    for name, f in chosen:
        meta = f.metadata
        if meta["group"] != group:
            group = meta["group"]
            lines += ["", f"**{GROUPS[group]}**", "", "| flag | default | what it does |"]
            lines.append("|---|---|---|")
        flag = "--" + name.replace("_", "-")
        star = " (in `--help`)" if meta["essential"] else ""
        default = "" if f.default is None else f"`{f.default}`"
        lines.append(f"| `{flag}`{star} | {default} | {meta['help']} |")
    return "\n".join(lines[1:])


if __name__ == "__main__":
    print(reference())
