"""The ``sharelora`` command (design §5). User errors exit 2 with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import DEFAULT_BACKBONE, METHODS, USER_STATES, UsageError
from .flags import BACKBONE_HELP, add_data, add_model, add_split, add_train

# Embedded demo defaults: MiniLM with adapters in its top block, so that the frozen blocks
# below are cached once per text and the whole comparison fits a laptop CPU (see README).
DEMO = {
    "methods": "shared,independent,sharelora,sharelora-head",
    "top_layers": 1,
    "epochs": 3,
    "lr": 2e-3,
    "max_length": 128,
    "val": 0.1,
    "test": 0.25,
    "from_shared": True,
}
DEMO_QUICK = {"top_users": 5, "max_per_user": 25}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharelora", description=__doc__)
    parser.add_argument("--config", help="YAML or TOML file holding any flags (flags win)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="compare the personalized methods with shared on builtin data")
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute on CPU)")
    p.add_argument("--output", default="sharelora-demo")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train", help="train one personalized reward model")
    add_data(p), add_split(p), add_model(p), add_train(p)
    p.add_argument(
        "--from-shared",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for a personalized method, train the shared model first (OUTPUT/shared) and start "
        "every user from it; validation can fall back to it (default unless --init-from gives "
        "one; --no-from-shared: start from the backbone)",
    )
    p.add_argument("--output", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last")
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start every user from this trained shared model (the population model)",
    )

    p = sub.add_parser("compare", help="train several methods on one split; report and plot")
    add_data(p), add_split(p), add_model(p), add_train(p)
    p.add_argument("--methods", default="shared,independent,sharelora")
    p.add_argument(
        "--from-shared",
        action="store_true",
        help="train shared first and start every personalized method from it",
    )
    p.add_argument(
        "--shots",
        help="with --holdout-users: few-shot curves at these k, e.g. "
        "5,10,25,50; onboards every personalized method among --methods (needs shared too)",
    )
    p.add_argument("--output", required=True)

    p = sub.add_parser("eval", help="per-user accuracy of a trained model on data")
    add_data(p)
    p.add_argument("--model", required=True)
    p.add_argument("--output", help="write metrics.json here")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    p.add_argument(
        "--unknown-user",
        choices=("error", "population"),
        default="error",
        help="score users the model does not know (a split dropped them, or they are new) with "
        "the population model; the metrics count the rows and users affected",
    )

    p = sub.add_parser("score", help="add a reward to each row of a JSONL file")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="JSONL rows with prompt?, response, user")
    p.add_argument("--output", required=True)
    p.add_argument("--response-col", default="response")
    p.add_argument("--prompt-col", default="prompt")
    p.add_argument("--user-col", default="user")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--unknown-user",
        choices=("error", "population"),
        default="error",
        help="score users the model does not know with the population adapter",
    )

    p = sub.add_parser("onboard", help="add new users from a few comparisons each")
    add_data(p), add_train(p)
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)

    p = sub.add_parser("export", help="write one user's reward model (merged or PEFT)")
    p.add_argument("--model", required=True)
    p.add_argument("--user", help="the user (any name for method shared)")
    p.add_argument("--format", choices=("merged", "peft"), default="merged")
    p.add_argument("--output", required=True)

    p = sub.add_parser("serve", help="serve rewards over HTTP (OpenRLHF /get_reward, /score)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass",
    )
    p.add_argument("--unknown-user", choices=("error", "population"), default="error")

    p = sub.add_parser("plan", help="parameter and memory budget per method, from the config")
    p.add_argument("--users", type=int, required=True, help="number of users N")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    p.add_argument("--method", choices=list(METHODS), default="sharelora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", help="module-name suffixes (default: per architecture)")
    p.add_argument("--top-layers", type=int, help="adapt only the top k blocks")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the frozen backbone weights",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=80.0,
        help="memory for weights, gradients and AdamW state (default: one 80 GB GPU)",
    )
    p.add_argument(
        "--user-state",
        choices=USER_STATES,
        default="full",
        help="optimizer state of user tables the recommendation assumes",
    )
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("simulate", help="linear low-rank Bradley-Terry sample-complexity sweep")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (under 2 minutes)")
    p.add_argument("--output", default="sharelora-simulate")
    p.add_argument("--n", help="comparisons per user, e.g. 5,10,20,50,100,200")
    p.add_argument("--users", help="numbers of users N, e.g. 10,100")
    p.add_argument("--rank", help="ranks r, e.g. 2")
    p.add_argument("--seeds", help="seeds, e.g. 0,1,2")
    p.add_argument("--dim", type=int, default=16, help="feature dimension d")
    p.add_argument(
        "--individual",
        type=float,
        default=0.0,
        help="scale of each user's individual deviation from the low-rank structure",
    )

    p = sub.add_parser("prepare", help="build a dataset file from a public source")
    p.add_argument("name", choices=("tldr", "helpsteer2"))
    p.add_argument("--output", required=True)
    p.add_argument("--source", help="hub id or local copy (default: the public dataset)")
    p.add_argument("--top-k", type=int, default=5, help="tldr: workers kept")
    p.add_argument("--ties", choices=("drop", "random"), default="drop", help="helpsteer2")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _load_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config {path}: file not found")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # parser errors differ by format; all mean a malformed file
        raise UsageError(f"config {path}: cannot parse ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: expected a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags, with ``--config`` values as defaults: a flag on the command line wins, and a
    config file may hold any flag, required ones included."""
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    required = {}
    for name, sub in subparsers.items():  # checked after the config file is merged
        for action in sub._actions:
            if action.required and action.option_strings:
                action.required = False
                required.setdefault(name, []).append(action)
    args = parser.parse_args(argv)
    sub = subparsers[args.command]
    if args.config:
        config = _load_config(args.config)
        unknown = sorted(set(config) - {a.dest for a in sub._actions})
        if unknown:
            raise UsageError(
                f"config {args.config}: unknown option(s) for '{args.command}': "
                f"{', '.join(unknown)}"
            )
        sub.set_defaults(**config)
        args = parser.parse_args(argv)
    missing = [
        a.option_strings[0] for a in required.get(args.command, []) if getattr(args, a.dest) is None
    ]
    if missing:
        raise UsageError(
            f"{args.command}: {', '.join(missing)} required (as a flag or in --config)"
        )
    return args


def demo_argv(args: argparse.Namespace) -> list[str]:
    """``sharelora demo`` is ``sharelora compare`` on the builtin data with ``DEMO`` settings."""
    settings = {**DEMO, **(DEMO_QUICK if args.quick else {})}
    argv = ["compare", "--data", "builtin:demo", "--output", args.output]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv + (["--no-progress"] if args.no_progress else [])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        started, demo = time.time(), args.command == "demo"
        if demo:
            args = parse_args(demo_argv(args))
        from .commands import run

        run(args)
        if demo:
            print(
                f"demo finished in {time.time() - started:.0f}s; report: {args.output}/report.md, "
                f"plot: {args.output}/accuracy.png",
                file=sys.stderr,
            )
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("sharelora: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        if not _is_user_error(err):
            raise
        print(f"sharelora: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _is_user_error(err: BaseException) -> bool:
    from .backbone import BackboneError
    from .data import DataError
    from .model import ModelFormatError
    from .train import TrainingError
    from .users import UnknownUserError

    user = (
        UsageError,
        DataError,
        ModelFormatError,
        BackboneError,
        TrainingError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        UnknownUserError,
        json.JSONDecodeError,
    )
    # ValueErrors raised by config validation (AdapterConfig, TrainConfig, SplitConfig) too.
    return isinstance(err, user) or type(err) is ValueError


if __name__ == "__main__":
    sys.exit(main())
