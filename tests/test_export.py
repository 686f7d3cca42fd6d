"""export -> PeftModel.from_pretrained (or a merged model) -> the run's recorded evaluation, and eval."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.experiment import load_eval_split
from fedsubspace.export import export_run
from fedsubspace.models import load_model
from fedsubspace.scoring import EvalResult, encode, evaluate
from fedsubspace.simulation import run
from fedsubspace.state import load_state

CONFIGS = Path(__file__).parent.parent / "configs"
# Exact for the adapter (the same tensors in the same modules); the merged weights W0 + s B A are
# summed once instead of in every forward pass, which moves the loss by float32 rounding only.
LOSS_TOLERANCE = 1e-6


def train(tmp: Path, name: str, config: str, method: str, *overrides: str) -> Path:
    """A two-round tiny run, its learning rate raised so the trained model scores clearly apart from the
    initial one (else an export that lost the training would pass)."""
    out = tmp / name
    settings = ["learning_rate=0.01", *overrides]
    run(load_config(CONFIGS / config, settings, method=method), out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "encoder": train(tmp, "encoder", "tiny-encoder.yaml", "fedavg"),
        "causal": train(tmp, "causal", "tiny-causal.yaml", "svd"),
        "fedex": train(tmp, "fedex", "tiny-encoder.yaml", "fedex"),
        "glora": train(tmp, "glora", "tiny-encoder.yaml", "glora", "client_ranks=cycle(2,4)"),
        "flora": train(tmp, "flora", "tiny-causal.yaml", "flora", "client_ranks=cycle(2,4)"),
    }


def recorded(run_dir: Path, which: str) -> dict:
    """The metrics line of the round the checkpoint holds (round 0: the summary's initial result)."""
    state_round = load_state(run_dir / "checkpoints" / f"{which}.safetensors").round
    summary = json.loads((run_dir / "summary.json").read_text())
    if state_round == 0:
        return {"eval_accuracy": summary["initial_eval_accuracy"], "eval_loss": summary["initial_eval_loss"]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["round"] == state_round)


def score_loaded(run_dir: Path, export: Path, *, merged: bool) -> EvalResult:
    """The export loaded the way a transformers user would, on the run's own evaluation questions."""
    config = load_config(run_dir / "config.yaml")
    base = load_model(config.model, config.model_kind, device="cpu", seed=config.seed)
    model: torch.nn.Module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if merged:
            model = load_model(str(export), None, device="cpu").model
        else:
            model = PeftModel.from_pretrained(base.model, str(export))
    encoded = encode(load_eval_split(config), base.tokenizer, base.kind, config.max_length)
    return evaluate(model, encoded, base.kind, batch_size=config.eval_batch_size, device="cpu")


def assert_scores_as_recorded(result: EvalResult, row: dict) -> None:
    assert result.accuracy == row["eval_accuracy"]
    assert result.loss == pytest.approx(row["eval_loss"], abs=LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["encoder", "causal"])
@pytest.mark.parametrize("which", ["last", "best"])
def test_an_exported_adapter_scores_what_the_run_recorded(runs, tmp_path, name, which):
    export = tmp_path / "adapter"
    assert main(["export", str(runs[name]), "--out", str(export), "--round", which]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in export.iterdir()}
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["modules_to_save"] == (["classifier"] if name == "encoder" else None)
    assert_scores_as_recorded(score_loaded(runs[name], export, merged=False), recorded(runs[name], which))


def test_the_last_round_differs_from_the_initial_model_so_the_comparison_can_fail(runs):
    for name in ("encoder", "causal", "fedex", "glora", "flora"):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert abs(summary["final_eval_loss"] - summary["initial_eval_loss"]) > 100 * LOSS_TOLERANCE


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_merging_methods_export_merged_with_their_residual_and_refuse_a_bare_adapter(
    runs, tmp_path, capsys, name
):
    assert load_state(runs[name] / "checkpoints" / "last.safetensors").residual
    assert main(["export", str(runs[name]), "--out", str(tmp_path / "bare"), "--round", "last"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--merged" in err
    merged = tmp_path / "merged"
    assert main(["export", str(runs[name]), "--out", str(merged), "--round", "last", "--merged"]) == 0
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    result = score_loaded(runs[name], merged, merged=True)
    assert_scores_as_recorded(result, recorded(runs[name], "last"))


def test_merged_fedavg_scores_as_its_adapter(runs, tmp_path):
    export_run(runs["causal"], tmp_path / "merged", which="last", merged=True, log=lambda _: None)
    result = score_loaded(runs["causal"], tmp_path / "merged", merged=True)
    assert_scores_as_recorded(result, recorded(runs["causal"], "last"))


def test_glora_with_mixed_ranks_exports_at_the_largest_rank_and_at_a_chosen_one(runs, tmp_path, capsys):
    export = tmp_path / "glora"
    assert main(["export", str(runs["glora"]), "--out", str(export), "--round", "last"]) == 0
    assert json.loads((export / "adapter_config.json").read_text())["r"] == 4
    assert_scores_as_recorded(
        score_loaded(runs["glora"], export, merged=False), recorded(runs["glora"], "last")
    )

    small = tmp_path / "glora-r2"
    assert main(["export", str(runs["glora"]), "--out", str(small), "--round", "last", "--rank", "2"]) == 0
    assert json.loads((small / "adapter_config.json").read_text())["r"] == 2
    # The rank-2 readout is another model (the best rank-2 approximation): it loads and scores.
    assert score_loaded(runs["glora"], small, merged=False).num_examples == 64

    assert main(["export", str(runs["glora"]), "--out", str(tmp_path / "x"), "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ranks 1 to 4" in err


def test_a_single_rank_method_refuses_another_rank(runs, tmp_path, capsys):
    assert main(["export", str(runs["encoder"]), "--out", str(tmp_path / "x"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only its global rank 4" in err
    assert not (tmp_path / "x").exists()


def test_an_unfinished_run_is_refused_naming_its_rounds(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["encoder"], unfinished)
    (unfinished / "summary.json").unlink()
    metrics = unfinished / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    assert main(["export", str(unfinished), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unfinished" in err and "round 1 of 2 done" in err and "--resume" in err


def test_a_directory_of_another_tool_is_refused(tmp_path, capsys):
    other = tmp_path / "lightning_logs"
    other.mkdir()
    (other / "events.out.tfevents.1").write_bytes(b"")
    assert main(["export", str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a fedsubspace results directory" in err

    hydra = tmp_path / "outputs"  # a config.yaml and a checkpoint of the right names, but not ours
    (hydra / "checkpoints").mkdir(parents=True)
    (hydra / "config.yaml").write_text("trainer:\n  max_epochs: 3\n")
    (hydra / "checkpoints" / "last.safetensors").write_bytes(b"not safetensors")
    assert main(["export", str(hydra), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a fedsubspace config" in err and "trainer" in err


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(runs, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["export", str(runs["encoder"]), "--out", str(keep), "--overwrite"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"


def run_eval(argv: list[str], capsys) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_scores_a_run_its_export_and_the_base_model_as_recorded(runs, tmp_path, capsys):
    row = recorded(runs["causal"], "last")
    scores = run_eval([str(runs["causal"]), "--round", "last"], capsys)
    assert scores["accuracy"] == row["eval_accuracy"]
    assert scores["loss"] == pytest.approx(row["eval_loss"], abs=LOSS_TOLERANCE)
    n, p = scores["examples"], scores["accuracy"]
    assert scores["accuracy_stderr"] == pytest.approx((p * (1 - p) / n) ** 0.5)

    export_run(runs["causal"], tmp_path / "adapter", which="last", log=lambda _: None)
    exported = run_eval([str(tmp_path / "adapter")], capsys)
    assert exported["accuracy"] == row["eval_accuracy"]
    assert exported["loss"] == pytest.approx(row["eval_loss"], abs=LOSS_TOLERANCE)
    assert main(["eval", str(tmp_path / "adapter"), "--round", "last"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    summary = json.loads((runs["causal"] / "summary.json").read_text())
    base = run_eval(["--base", "--config", str(CONFIGS / "tiny-causal.yaml")], capsys)
    assert base["accuracy"] == summary["initial_eval_accuracy"]
    assert base["loss"] == pytest.approx(summary["initial_eval_loss"], abs=LOSS_TOLERANCE)


def test_eval_on_another_split_of_the_same_task(runs, capsys):
    scores = run_eval(
        [str(runs["encoder"]), "--set", "eval_split=train", "--set", "max_eval_samples=20"], capsys
    )
    assert scores["split"] == "train" and scores["examples"] == 20


def test_eval_refuses_data_with_another_choice_count(runs, tmp_path, capsys):
    data = tmp_path / "two-way"
    data.mkdir()
    rows = [
        {"ctx": f"question {i}", "endings": ["yes", "no"], "label": i % 2, "activity_label": "a"}
        for i in range(8)
    ]
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(runs["encoder"]), "--set", f"dataset={data}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4-way" in err and "has 2" in err


def test_a_personalised_run_is_refused_for_want_of_a_global_model(tmp_path, capsys):
    fedsa = train(tmp_path, "fedsa", "tiny-encoder.yaml", "fedsa", "num_rounds=1")
    assert main(["export", str(fedsa), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "personalised" in err


def test_eval_wants_one_model_to_score(runs, capsys):
    config = str(CONFIGS / "tiny-encoder.yaml")
    assert main(["eval", "--config", config]) == 2
    assert main(["eval", str(runs["encoder"]), "--base", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("or --base") == 2
