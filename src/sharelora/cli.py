"""The ``sharelora`` command (design §5). User errors exit 2 with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .config import DataConfig, RunConfig, TrainConfig, UsageError
from .flags import HelpAll, add_fields
from .presets import PRESETS

# What onboarding leaves out of its flags: what it fixes itself (its preset), and what has no
# effect there (no validation to select or refit on; the model's own token budget; frozen
# shared factors take no decay).
ONBOARD_FIXED = (
    *PRESETS["onboard"].settings,
    "max_length",
    "weight_decay",
    "eval_every",
    "select_best",
    "refit",
    "backbone",
    "revision",
    "trust_remote_code",
    "from_shared",
    "resume",
    "preset",
)
# Data flags that change nothing for a command that reads rows without splitting them.
SPLIT_ONLY = ("group_col", "split_col", "test_data")
UNKNOWN_USER = ("error", "population")


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharelora", description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", help="YAML or TOML file holding any flags (flags win)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # No abbreviations: compare --method would otherwise pass for --methods.
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        full = lambda: build_parser(True)._subparsers._group_actions[0].choices[name]  # noqa: E731
        p.add_argument("--help-all", action=HelpAll, full=full)
        return p

    def unknown_user(p, help: str) -> None:
        p.add_argument("--unknown-user", choices=UNKNOWN_USER, default="error", help=help)

    def fields(p, **kw):
        add_fields(p, **{"show_all": show_all, **kw})

    p = command("demo", "compare the personalized methods with shared on builtin data")
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute on CPU)")
    p.add_argument("--output", default="sharelora-demo", help="the directory the demo writes")
    fields(p, only=("progress",), show_all=True)

    p = command("train", "train one personalized reward model")
    fields(p, required=("data", "output"))

    p = command("compare", "train several methods on one split; report and plot")
    fields(
        p,
        exclude=("method", "resume", "init_from", "shard_users"),  # compare trains dense DDP
        required=("data", "output"),
        defaults={"from_shared": False},
    )
    p.add_argument(
        "--methods",
        default="shared,independent,sharelora",
        help="comma-separated methods, each optionally METHOD+PRESET (e.g. sharelora+unpooled)",
    )
    p.add_argument(
        "--shots",
        help="with --holdout-users: few-shot curves at these k, e.g. 5,10,25,50; onboards every "
        "personalized method among --methods (needs shared too)",
    )

    p = command("eval", "per-user accuracy of a trained model on data")
    fields(p, classes=(DataConfig,), exclude=SPLIT_ONLY, required=("data",))
    p.add_argument("--model", required=True, help="a trained model directory")
    p.add_argument("--output", help="write metrics.json here")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    unknown_user(
        p,
        "score users the model does not know (a split dropped them, or they are new) with "
        "the population model; the metrics count the rows and users affected",
    )

    p = command("score", "add a reward to each row of a JSONL file")
    p.add_argument("--model", required=True, help="a trained model directory")
    p.add_argument("--input", required=True, help="JSONL rows with prompt?, response, user")
    p.add_argument("--output", required=True, help="the JSONL file written: each row + reward")
    p.add_argument("--response-col", default="response", help="column holding the response")
    p.add_argument("--prompt-col", default="prompt", help="column holding the prompt (optional)")
    p.add_argument("--user-col", default="user", help="column holding the user id")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    unknown_user(p, "score users the model does not know with the population adapter")

    p = command("onboard", "add new users from a few comparisons each")
    fields(
        p,
        classes=(DataConfig, RunConfig, TrainConfig),
        exclude=(*ONBOARD_FIXED, *SPLIT_ONLY, "shard_users"),  # new users only: dense DDP
        required=("data", "output"),
    )
    p.add_argument("--model", required=True, help="the trained model the users join")

    p = command("export", "write one user's reward model (merged or PEFT)")
    p.add_argument("--model", required=True, help="a trained model directory")
    p.add_argument("--user", help="the user (any name for method shared)")
    p.add_argument(
        "--format",
        choices=("merged", "peft"),
        default="merged",
        help="merged: a plain transformers model; peft: a LoRA adapter over the backbone",
    )
    p.add_argument("--output", required=True, help="the directory written")

    p = command("serve", "serve rewards over HTTP (OpenRLHF, verl / vLLM /classify, /score)")
    p.add_argument("--model", required=True, help="a trained model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its forward pass",
    )
    unknown_user(p, "answer users the model does not know with the population model")

    p = command("plan", "parameter and memory budget per method, from the config")
    p.add_argument("--users", type=int, required=True, help="number of users N")
    fields(
        p,
        only=(
            "backbone",
            "trust_remote_code",
            "method",
            "rank",
            "targets",
            "top_layers",
            "user_state",
        ),
        show_all=True,
    )
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
    p.add_argument("--json", help="also write the numbers here")

    command("presets", "list the named presets and what each sets")

    p = command("simulate", "linear low-rank Bradley-Terry sample-complexity sweep")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (under 2 minutes)")
    p.add_argument("--output", default="sharelora-simulate", help="the directory written")
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

    p = command("prepare", "build a dataset file from a public source")
    p.add_argument("name", choices=("tldr", "helpsteer2"), help="the public source to build")
    p.add_argument("--output", required=True, help="the .jsonl file written")
    p.add_argument("--source", help="hub id or local copy (default: the public dataset)")
    p.add_argument("--top-k", type=int, default=5, help="tldr: workers kept")
    p.add_argument(
        "--ties",
        choices=("drop", "random"),
        default="drop",
        help="helpsteer2: drop tied ratings, or order them at random",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
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
    """Flags over ``--config`` values over ``--preset`` settings over the fields' defaults:
    a flag on the command line wins, and a config file may hold any flag, required ones
    included."""
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
    config = _load_config(args.config) if args.config else {}
    unknown = sorted(set(config) - {a.dest for a in sub._actions})
    if unknown:
        hints = [
            f"{key} is set by --preset {' or '.join(by)}"
            for key in unknown
            if (by := [n for n, p in PRESETS.items() if key in p.settings])
        ]
        raise UsageError(
            f"config {args.config}: unknown option(s) for '{args.command}': {', '.join(unknown)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )
    preset = getattr(args, "preset", None)
    if preset == RunConfig.preset and "preset" in config:  # not on the command line
        preset = config["preset"]
    if preset or config:
        from .presets import resolve

        sub.set_defaults(**{**(resolve(preset, args.command) if preset else {}), **config})
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
    """``sharelora demo`` is ``sharelora compare`` on the builtin data with the demo preset."""
    preset = "demo-quick" if args.quick else "demo"
    argv = ["compare", "--data", "builtin:demo", "--output", args.output, "--preset", preset]
    return argv + ([] if args.progress else ["--no-progress"])


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"sharelora: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _one_line_warning  # a user's warning is one line, as errors are
    try:
        args = parse_args(argv)
        started, demo = time.time(), args.command == "demo"
        if demo:
            args = parse_args(demo_argv(args))
        from .commands import run

        run(args)
        _close_process_group()
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


def _close_process_group() -> None:
    """Close a multi-process run's process group after a run that succeeded. Left open, gloo's
    threads can abort the process as the interpreter tears down ("terminate called without an
    active exception", exit -6). Not after a failure: a rank that closes while the others are
    still in a collective would hang them."""
    dist = sys.modules.get("torch.distributed")  # loaded only if the run used torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
