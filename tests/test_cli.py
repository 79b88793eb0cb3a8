"""The command line: files written, formats, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import opposite_tastes

from sharelora.cli import main
from sharelora.trl import reward_function

# The smallest training that still runs every step of the pipeline.
TINY = ["--epochs", "1", "--rank", "2", "--max-length", "32", "--no-progress"]


def _write_data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [
        {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "user": c.user}
        for c in opposite_tastes(20)
    ]
    return _write_data(tmp_path_factory.mktemp("data") / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def trained(tiny_text_backbone, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    code = main(
        [
            "train",
            "--data",
            data_file,
            "--backbone",
            tiny_text_backbone,
            "--output",
            str(out),
            "--epochs",
            "2",
            "--rank",
            "2",
            "--max-length",
            "32",
            "--no-progress",
            "--lr",
            "1e-2",
            # Fully personal: its few validation pairs could not show the gain, and these tests
            # need users who score apart.
            "--strength",
            "1",
        ]
    )
    assert code == 0
    return out


def test_train_writes_the_contract(trained):
    for name in (
        "sharelora.json",
        "users.json",
        "adapters.safetensors",
        "metrics.json",
        "val_metrics.json",
        "train_log.jsonl",
        "split.json",
        "tokenizer.json",
    ):
        assert (trained / name).exists(), name
    config = json.loads((trained / "sharelora.json").read_text())
    assert config["adapter"]["method"] == "sharelora" and config["num_users"] == 2
    assert config["training"]["steps"] > 0
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["method"] == "sharelora"
    assert set(metrics["users"]) == {"sunny", "rainy"}
    # design §4's fields, plus the loss of the user's ranking that strength selection reads
    assert set(metrics["users"]["sunny"]) == {"accuracy", "loss", "calibrated_loss", "n"}
    assert 0 <= metrics["macro_accuracy"] <= 1 and 0 <= metrics["micro_accuracy"] <= 1
    assert (trained / "checkpoints" / "last" / "trainer_state.json").exists()
    # A personalized run starts from a shared model it trains first, on the same split, and
    # chooses on a text carve in select/ before its refit on every non-test pair.
    training = config["training"]
    assert json.loads((trained / "shared" / "sharelora.json").read_text())["adapter"][
        "method"
    ] == "shared" and training["config"]["init_from"] == str(trained / "shared")
    assert (trained / "select" / "sharelora.json").exists() and training["select"]["served"]
    split = json.loads((trained / "split.json").read_text())
    # The choosing run starts from the shared model's own choosing run, which trained on the
    # training fold alone: the refitted shared model saw validation's pairs, and would win
    # validation by memory. The refit starts from the refitted shared model.
    chooser = json.loads((trained / "select" / "sharelora.json").read_text())["training"]
    assert chooser["config"]["init_from"] == str(trained / "shared" / "select")
    assert training["select"]["init_from"] == chooser["config"]["init_from"]
    shared_select = json.loads((trained / "shared" / "select" / "sharelora.json").read_text())
    assert shared_select["training"]["train_pairs"] == split["sizes"]["train"]
    assert (
        json.loads((trained / "shared" / "sharelora.json").read_text())["training"]["train_pairs"]
        == training["train_pairs"]
    )
    assert split["val_by"] == "text" and training["validation"]["seen_text_share"] == 0.0
    assert (
        training["train_pairs"]
        == split["sizes"]["train"]
        + split["sizes"]["val"]
        + split["sizes"]["dropped_between_train_and_val"]
    )
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "lr"} <= set(log[0])


def test_eval_prints_table_and_writes_metrics(trained, data_file, tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(trained),
                "--data",
                data_file,
                "--output",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| user | n | sharelora |" in out and "95% bootstrap interval" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 40 and len(metrics["macro_accuracy_ci95"]) == 2


def test_score_keeps_order_and_fields(trained, tmp_path):
    rows = [
        {"prompt": "q?", "response": "yes apple", "user": "sunny", "id": 7, "meta": [1]},
        {"response": "no apple", "user": "rainy", "id": 3},
        {"prompt": "q?", "response": "yes apple", "user": "rainy", "id": 5},
    ]
    _write_data(tmp_path / "in.jsonl", rows)
    assert (
        main(
            [
                "score",
                "--model",
                str(trained),
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in out] == rows
    assert all(isinstance(r["reward"], float) for r in out)
    assert out[0]["reward"] != out[2]["reward"]  # same text, different users
    f = reward_function(str(trained))
    assert f(prompts=["q?"], completions=["yes apple"], user=["sunny"], id=[7]) == pytest.approx(
        [out[0]["reward"]], abs=1e-5
    )


def test_score_empty_input_and_unknown_user(trained, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert (
        main(
            [
                "score",
                "--model",
                str(trained),
                "--input",
                str(tmp_path / "empty.jsonl"),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 0
    )
    assert (tmp_path / "o.jsonl").read_text() == ""
    capsys.readouterr()
    _write_data(tmp_path / "u.jsonl", [{"response": "x", "user": "zed"}])
    assert (
        main(
            [
                "score",
                "--model",
                str(trained),
                "--input",
                str(tmp_path / "u.jsonl"),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown user 'zed'" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "fmt,marker", [("merged", "model.safetensors"), ("peft", "adapter_model.safetensors")]
)
def test_export(trained, tmp_path, fmt, marker):
    assert (
        main(
            [
                "export",
                "--model",
                str(trained),
                "--user",
                "sunny",
                "--format",
                fmt,
                "--output",
                str(tmp_path / fmt),
            ]
        )
        == 0
    )
    assert (tmp_path / fmt / marker).exists()


def test_compare_report_plot_and_metrics(tiny_text_backbone, data_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--data",
                data_file,
                "--backbone",
                tiny_text_backbone,
                "--methods",
                "shared,sharelora",
                "--output",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    report = (out / "report.md").read_text()
    assert "| user | n | shared | sharelora |" in report and "**macro**" in report
    assert "**" in report.split("**macro**")[1]  # the best value is bold
    assert (out / "accuracy.png").stat().st_size > 1000
    for method in ("shared", "sharelora"):
        assert json.loads((out / method / "metrics.json").read_text())["method"] == method
    assert "| user | n | shared | sharelora |" in capsys.readouterr().out
    # The diagnostics: room for personalization, gains against shared, shuffled users.
    assert "## Does personalization pay here?" in report and "| sharelora |" in report
    diag = json.loads((out / "summary.json").read_text())["diagnostics"]
    assert diag["baseline"] == "shared" and diag["room"]["user_pairs"] >= 0
    assert diag["methods"]["sharelora"]["shuffled_macro_accuracy"] is not None
    assert diag["methods"]["shared"]["shuffled_macro_accuracy"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data", "missing.jsonl", "--output", "x"], "missing.jsonl: file not found"),
        (
            ["eval", "--model", "nowhere", "--data", "builtin:demo"],
            "sharelora.json: file not found",
        ),
        (
            ["compare", "--data", "builtin:demo", "--methods", "lora", "--output", "x"],
            "--methods: method must be one of shared",
        ),
        (
            ["train", "--data", "builtin:demo", "--output", "x", "--rank", "0"],
            "rank must be a positive integer",
        ),
        (
            ["train", "--data", "builtin:demo", "--output", "x", "--freeze-shared"],
            "unrecognized arguments: --freeze-shared",  # a research setting: --preset frozen
        ),
        (
            [
                "compare",
                "--data",
                "builtin:demo",
                "--output",
                "x",
                "--preset",
                "frozen",
                "--no-from-shared",
            ],
            "compare --preset frozen freezes the methods that start from this run's shared",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress lines may come first; the error is one line
    assert message in last and last.startswith("sharelora: error:") and "Traceback" not in err


def test_bad_rows_name_file_line_and_column(tmp_path, capsys):
    bad = _write_data(tmp_path / "bad.jsonl", [{"chosen": "a", "rejected": "a", "user": "u"}])
    assert main(["train", "--data", bad, "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl: 1 bad row(s): line 1 column 'chosen'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "suffix,text",
    [
        (".yaml", "epochs: 7\nrank: 3\nmethod: diag\n"),
        (".toml", 'epochs = 7\nrank = 3\nmethod = "diag"\n'),
    ],
)
def test_config_file_and_flags_win(tmp_path, suffix, text):
    from sharelora.cli import parse_args

    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    args = parse_args(
        ["--config", str(cfg), "train", "--data", "d.jsonl", "--output", "o", "--rank", "5"]
    )
    assert (args.epochs, args.rank, args.method) == (7, 5, "diag")


def test_config_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoch: 7\n")
    assert main(["--config", str(cfg), "train", "--data", "d", "--output", "o"]) == 2
    assert "unknown option(s) for 'train': epoch" in capsys.readouterr().err


def test_config_may_hold_required_flags(tmp_path, capsys):
    from sharelora.cli import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: builtin:demo\noutput: out\n")
    args = parse_args(["--config", str(cfg), "train"])
    assert (args.data, args.output) == ("builtin:demo", "out")
    assert main(["train", "--data", "builtin:demo"]) == 2
    assert "train: --output required" in capsys.readouterr().err


def test_compare_fewshot_curves_for_held_out_users(tiny_text_backbone, tmp_path, capsys):
    from conftest import opposite_tastes as tastes

    rows = [
        {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "user": c.user + suffix}
        for suffix, seed in (("", 0), ("-twin", 1))
        for c in tastes(20, seed=seed)
    ]
    data = _write_data(tmp_path / "d.jsonl", rows)
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--data",
                data,
                "--backbone",
                tiny_text_backbone,
                "--methods",
                "shared,sharelora,sharelora-head",
                "--holdout-users",
                "1",
                "--shots",
                "2,4",
                "--output",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    curves = json.loads((out / "fewshot.json").read_text())
    assert curves["shots"] == [2, 4] and len(curves["users"]) == 1
    assert set(curves["macro_accuracy"]) == {
        "sharelora onboarding",
        "sharelora-head onboarding",
        "shared",
        "independent (fresh)",
    }
    assert (out / "fewshot.png").stat().st_size > 1000
    assert "| sharelora onboarding |" in capsys.readouterr().out
    assert (
        main(
            [
                "compare",
                "--data",
                data,
                "--methods",
                "sharelora",
                "--shots",
                "2",
                "--output",
                str(out),
            ]
        )
        == 2
    )


def test_method_variants():
    from sharelora.compare import method_config
    from sharelora.train import TrainConfig

    base, cfg, start = method_config("sharelora+warmup", TrainConfig(epochs=3))
    assert (base, cfg.warmup_epochs, cfg.epochs, start) == ("sharelora", 1, 3, False)
    assert method_config("core", TrainConfig()) == ("core", TrainConfig(), None)
    base, cfg, start = method_config("sharelora+frozen", TrainConfig())
    assert (base, cfg.freeze_shared, start) == ("sharelora", True, True)
    with pytest.raises(ValueError, match="unknown method variant 'twice'"):
        method_config("core+twice", TrainConfig())
    assert (
        main(["compare", "--data", "builtin:demo", "--methods", "core+twice", "--output", "x"]) == 2
    )


# Per-user tables run through bmm, the shared model through one matmul: the same numbers in
# a different order, so rewards agree to float rounding; re-factored factors (QR and an r x r
# SVD in float32) add rounding of their own. Rewards, not accuracies: a tie counts half, so a
# margin within rounding of zero could flip an accuracy without anything being wrong.
@pytest.mark.parametrize("preset,rel", [("unpooled", 1e-6), ("unpooled,orthonormal", 1e-5)])
def test_train_init_from_shared_at_strength_zero_is_the_shared_model(
    tiny_text_backbone, data_file, tmp_path, preset, rel
):
    from sharelora.model import PersonalizedRewardModel
    from sharelora.score import score_texts

    common = ["--data", data_file, "--backbone", tiny_text_backbone, "--test", "0.25", *TINY]
    assert main(["train", "--method", "shared", "--output", str(tmp_path / "s"), *common]) == 0
    # unpooled: the population stays the start, so strength 0 serves the shared model itself.
    argv = ["train", "--init-from", str(tmp_path / "s"), "--preset", preset, "--strength", "0"]
    assert main([*argv, *common, "--output", str(tmp_path / "p")]) == 0
    shared, personal = (PersonalizedRewardModel.from_pretrained(tmp_path / d) for d in "sp")
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
    texts = ([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["user"] for r in rows])
    want, got = score_texts(shared, *texts), score_texts(personal, *texts)
    assert got == pytest.approx(want, rel=rel, abs=1e-7)
    saved = json.loads((tmp_path / "p" / "sharelora.json").read_text())["training"]
    assert saved["strength"] == 0.0 and saved["config"]["init_from"] == str(tmp_path / "s")
    factoring = "orthonormal" if "orthonormal" in preset else "as-trained"
    assert saved["config"]["init_factoring"] == factoring


def test_strength_flag_rejects_a_word(capsys):
    assert main(["train", "--data", "builtin:demo", "--output", "x", "--strength", "max"]) == 2
    assert "--strength" in capsys.readouterr().err


def test_adapt_top_layers_is_another_name_for_top_layers():
    from sharelora.cli import parse_args

    argv = ["train", "--data", "d.jsonl", "--output", "o"]
    assert parse_args([*argv, "--adapt-top-layers", "2"]).top_layers == 2
    assert parse_args([*argv, "--top-layers", "2"]).top_layers == 2


def test_the_command_line_parses_without_importing_torch():
    # `sharelora --help` must answer at once: no torch, transformers or accelerate import.
    code = "import sys, sharelora.cli as c; c.build_parser().parse_args(['train', '--help'])"
    probe = "import sharelora.cli, sys; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--epochs" in out.stdout and "--deterministic" not in out.stdout  # the essentials
    code = code.replace("'--help'", "'--help-all'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "--deterministic" in out.stdout and "scale and memory" in out.stdout


def test_onboard_into_the_models_own_directory(tiny_text_backbone, data_file, tmp_path):
    model = tmp_path / "m"
    common = ["--backbone", tiny_text_backbone, "--test", "0", *TINY]
    # A fixed strength: a refit that serves the shared start takes no step, writes no checkpoint.
    train = ["train", "--data", data_file, "--output", str(model), "--strength", "1", *common]
    assert main(train) == 0
    assert (model / "checkpoints" / "last").exists()  # a checkpoint of 2 users would not load
    new = _write_data(
        tmp_path / "new.jsonl",
        [{"chosen": "yes a", "rejected": "no b", "user": "cloudy"}] * 4,
    )
    argv = ["onboard", "--model", str(model), "--data", new, "--output", str(model)]
    argv += ["--epochs", "1", "--no-progress"]
    assert main(argv) == 0
    assert json.loads((model / "users.json").read_text())["users"][-1] == "cloudy"


def test_train_tests_on_a_separate_file(tiny_text_backbone, data_file, tmp_path):
    rows = [
        {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected, "user": c.user}
        for c in opposite_tastes(3, seed=5)
    ] + [{"chosen": "a", "rejected": "b", "user": "stranger"}]
    test = _write_data(tmp_path / "test.jsonl", rows)
    out = tmp_path / "m"
    argv = ["train", "--data", data_file, "--test-data", test, "--output", str(out)]
    assert main([*argv, "--backbone", tiny_text_backbone, *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and set(metrics["users"]) == {"sunny", "rainy"}
    split = json.loads((out / "split.json").read_text())
    assert split["sizes"]["test"] == 0  # nothing carved: the file is the test set


def test_eval_scores_unknown_users_with_the_population_on_request(trained, tmp_path, capsys):
    rows = [{"prompt": "q?", "chosen": "yes a", "rejected": "no b", "user": "stranger"}]
    data = _write_data(tmp_path / "new.jsonl", rows)
    assert main(["eval", "--model", str(trained), "--data", data]) == 2
    assert "--unknown-user population" in capsys.readouterr().err
    out = tmp_path / "m.json"
    argv = ["eval", "--model", str(trained), "--data", data, "--output", str(out)]
    assert main([*argv, "--unknown-user", "population"]) == 0
    assert "1 user(s) the model was not trained on (1 rows)" in capsys.readouterr().err
    assert json.loads(out.read_text())["unknown_users"] == {
        "policy": "population",
        "users": 1,
        "rows": 1,
    }


def test_train_from_shared_and_init_from_exclude_each_other(tmp_path, capsys):
    argv = ["train", "--data", "builtin:demo", "--output", str(tmp_path / "o")]
    assert main([*argv, "--init-from", str(tmp_path), "--from-shared"]) == 2
    assert "drop --from-shared" in capsys.readouterr().err


def test_a_run_that_succeeds_closes_its_process_group(tmp_path, monkeypatch):
    """A process group left open can abort a gloo process at exit; one that fails stays open
    (closing it while other ranks wait in a collective would hang them)."""
    import torch.distributed as dist

    import sharelora.commands

    def run(args, fail=False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                                world_size=1)  # fmt: skip
        if fail:
            raise TypeError("boom")

    monkeypatch.setattr(sharelora.commands, "run", run)
    assert main(["presets"]) == 0
    assert not dist.is_initialized()
    monkeypatch.setattr(sharelora.commands, "run", lambda args: run(args, fail=True))
    with pytest.raises(TypeError, match="boom"):
        main(["presets"])
    assert dist.is_initialized()
    dist.destroy_process_group()
