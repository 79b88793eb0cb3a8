"""What each ``sharelora`` subcommand does, given parsed arguments."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .config import AdapterConfig, TrainConfig, UsageError
from .files import write_json
from .flags import configs


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def cmd_train(args) -> None:
    from .recipe import run
    from .shard import is_main_process

    result = run(configs(args))
    if not is_main_process():  # under a launcher, one report
        return
    if result["metrics"]:
        _print_metrics(result["metrics"])
    _log(f"model written to {args.output}{served_note(result['summary'])}")


def served_note(summary: dict) -> str:
    """What the last line of a run says when validation kept the population."""
    if summary.get("served") != "population":
        return ""
    return "; personalization does not pay on this data: serving the population"


def _print_metrics(metrics: dict) -> None:
    from .report import accuracy_table

    print(accuracy_table({metrics["method"]: metrics}))
    ci = metrics.get("macro_accuracy_ci95")
    if ci:
        print(
            f"macro accuracy {metrics['macro_accuracy']:.3f} "
            f"(95% bootstrap interval over users {ci[0]:.3f}–{ci[1]:.3f})"
        )


def cmd_eval(args) -> None:
    from .evaluate import evaluate
    from .model import PersonalizedRewardModel
    from .recipe import read

    data = read(configs(args).data)  # bad data fails fast, before a large model loads
    model = PersonalizedRewardModel.from_pretrained(args.model)
    metrics = evaluate(model, data, args.batch_size, split="eval", unknown_user=args.unknown_user)
    _print_metrics(metrics)
    gone = metrics["unknown_users"]
    if gone["users"]:
        _log(
            f"{gone['users']} user(s) the model was not trained on ({gone['rows']} rows) scored "
            f"with the {gone['policy']} model"
        )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, metrics)


def cmd_score(args) -> None:
    from .data.read import jsonl_rows
    from .data.records import DataError
    from .model import PersonalizedRewardModel
    from .score import score_texts

    path = Path(args.input)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    for number, row in jsonl_rows(path):
        if isinstance(row, str):  # the reader's description of a malformed line
            raise DataError(f"{path}: line {number}: {row}")
        for col in (args.response_col, args.user_col):
            if not isinstance(row.get(col), (str, int)) or row.get(col) in ("", None):
                raise DataError(f"{path}: line {number} column {col!r}: missing or not text")
        if not isinstance(row.get(args.prompt_col, ""), str):
            raise DataError(f"{path}: line {number} column {args.prompt_col!r}: not text")
        rows.append(row)
    model = PersonalizedRewardModel.from_pretrained(args.model) if rows else None
    rewards = (
        score_texts(
            model,
            [r.get(args.prompt_col, "") for r in rows],
            [r[args.response_col] for r in rows],
            [r[args.user_col] for r in rows],
            args.batch_size,
            args.unknown_user,
        )
        if rows
        else []
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for row, reward in zip(rows, rewards, strict=True):
            f.write(json.dumps({**row, "reward": reward}, ensure_ascii=False) + "\n")
    _log(f"scored {len(rows)} rows -> {args.output}")


def cmd_onboard(args) -> None:
    from .model import PersonalizedRewardModel
    from .onboard import onboard
    from .recipe import read

    c = configs(args)
    cfg = c.train
    if cfg.prior == "auto":
        raise UsageError("onboard has no validation to choose --prior on: give a number (e.g. 1)")
    data = read(c.data)
    model = PersonalizedRewardModel.from_pretrained(args.model)
    before = model.num_users
    onboard(model, data, None, cfg, args.output)
    _log(
        f"onboarded {model.num_users - before} users ({len(data)} comparisons); "
        f"{model.num_users} users in {args.output}"
    )


def _int_list(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def cmd_simulate(args) -> None:
    from .simulate import SimConfig, markdown, simulate

    sweep = {
        "n": _int_list("--n", args.n),
        "users": _int_list("--users", args.users),
        "rank": _int_list("--rank", args.rank),
        "seeds": _int_list("--seeds", args.seeds),
    }
    if args.quick:
        sweep = {"n": [5, 10, 25, 50, 100], "users": [10, 100], "rank": [2], "seeds": [0, 1]} | {
            k: v for k, v in sweep.items() if v is not None
        }
    cfg = SimConfig(
        **{k: v for k, v in sweep.items() if v is not None},
        dim=args.dim,
        individual=args.individual,
    )
    started = time.time()
    result = simulate(cfg, args.output, progress=_log)
    print(markdown(result["summary"]))
    _log(
        f"simulate finished in {time.time() - started:.0f}s; {args.output}/results.json, "
        f"{args.output}/error_vs_n.png"
    )


def cmd_export(args) -> None:
    from .export import export_user
    from .model import PersonalizedRewardModel

    model = PersonalizedRewardModel.from_pretrained(args.model)
    export_user(model, args.user, args.output, format=args.format)
    _log(f"exported {args.format} model for user {args.user} -> {args.output}")


def cmd_compare(args) -> None:
    from .compare import compare, method_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods: name at least one method, e.g. shared,sharelora")
    for m in methods:
        try:
            base = method_config(m, TrainConfig())[0]
            AdapterConfig(method=base)
        except ValueError as err:
            raise UsageError(f"--methods: {err}") from None
    freeze = getattr(args, "freeze_shared", False)  # set by the preset frozen
    if freeze and not args.from_shared:
        raise UsageError(
            "compare --preset frozen freezes the methods that start from this run's shared "
            "model: drop --no-from-shared, or name METHOD+frozen in --methods instead"
        )
    from .recipe import read_split

    # compare applies freeze_shared to the methods that start from its shared model alone.
    c = configs(args, freeze_shared=False)
    splits = read_split(c.data, c.split)
    shots = _int_list("--shots", args.shots)
    onboarded = [m for m in methods if m.partition("+")[0] != "shared"]
    if shots and (not args.holdout_users or "shared" not in methods or not onboarded):
        raise UsageError(
            "--shots needs --holdout-users K, and shared and a personalized method (sharelora, "
            "...) in --methods"
        )
    results, _ = compare(
        splits,
        methods,
        c.adapter,
        c.train,
        c.run,
        args.output,
        log=_log,
        from_shared=args.from_shared,
        freeze_shared=freeze,
    )
    print((Path(args.output) / "report.md").read_text())
    if shots:
        from .fewshot import fewshot_curves

        out = Path(args.output)
        fewshot_curves(
            splits.holdout,
            shots,
            {m: out / m for m in ("shared", *onboarded)},
            c.run,
            c.adapter,
            c.train,
            out,
            log=_log,
        )
        print((out / "fewshot.md").read_text())
    return results


def cmd_prepare(args) -> None:
    from .data.builders import build_helpsteer2, build_tldr

    kw = {"source": args.source} if args.source else {}
    if args.name == "tldr":
        info = build_tldr(args.output, top_k=args.top_k, seed=args.seed, **kw)
    else:
        info = build_helpsteer2(args.output, ties=args.ties, seed=args.seed, **kw)
    _log(json.dumps(info))


def cmd_plan(args) -> None:
    from .plan import plan_table

    if args.users < 1:
        raise UsageError(f"--users must be a positive integer, got {args.users}")
    adapter = configs(args).adapter
    weight_bytes = 4 if args.dtype == "float32" else 2
    table, details = plan_table(
        args.backbone,
        adapter,
        args.users,
        weight_bytes,
        args.memory_gib,
        args.trust_remote_code,
        args.user_state,
    )
    print(table)
    if args.json:
        write_json(args.json, details)


def cmd_serve(args) -> None:
    from .serve import serve

    if args.batch_size < 1 or args.max_wait_ms < 0:
        raise UsageError("--batch-size must be >= 1 and --max-wait-ms >= 0")
    _log(f"serving {args.model} on http://{args.host}:{args.port} (/get_reward, /score, /health)")
    serve(
        args.model,
        args.host,
        args.port,
        args.device,
        args.batch_size,
        args.max_wait_ms,
        args.unknown_user,
    )


def cmd_presets(args) -> None:
    from .presets import table

    print(table())


COMMANDS = {
    "presets": cmd_presets,
    "train": cmd_train,
    "eval": cmd_eval,
    "score": cmd_score,
    "export": cmd_export,
    "compare": cmd_compare,
    "prepare": cmd_prepare,
    "plan": cmd_plan,
    "onboard": cmd_onboard,
    "simulate": cmd_simulate,
    "serve": cmd_serve,
}


def run(args) -> None:
    COMMANDS[args.command](args)
