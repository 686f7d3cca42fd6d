"""``fedsubspace bench round`` and the random-weight shapes it times."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import FIXTURE, ROOT

from fedsubspace import shapes
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.experiment import prepare

PAPER_TARGETS = {
    "encoder": "target_modules=[query, key, value, dense]",
    "causal": "target_modules=[q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj]",
}


def test_bench_round_times_every_phase_and_both_evaluations(capsys) -> None:
    config = str(ROOT / "configs" / "tiny-encoder.yaml")
    code = main(["bench", "round", "--config", config, "--rounds", "2", "--questions", "16", "--json",
                 "--method", "fedex", "--set", f"dataset={FIXTURE}",
                 "--set", "max_local_steps=2"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "fedex" and report["eval_questions"] == 16 and report["device"] == "cpu"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        for key in ("train", "aggregate", "diagnostics"):
            assert row[f"{key}_seconds"] > 0 and row[f"{key}_peak_mib"] > 0
        assert row["eval_seconds_merged"] > 0 and row["eval_seconds_unmerged"] > 0
        assert row["eval_loss_merged"] == pytest.approx(row["eval_loss_unmerged"], rel=1e-5)


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_every_shape_builds_offline_and_takes_the_paper_targets(name: str, monkeypatch) -> None:
    """Cut to one block (the full sizes are 125-362M parameters): the builder, tokenizer and targets."""
    shape = shapes.SHAPES[name]
    one_block = dataclasses.replace(shape, sizes={**shape.sizes, "num_hidden_layers": 1})
    monkeypatch.setitem(shapes.SHAPES, name, one_block)
    overrides = [f"dataset={FIXTURE}", "max_train_samples=8", "max_eval_samples=2", "num_clients=2",
                 "partition=iid", "max_length=32", PAPER_TARGETS[shape.kind]]  # fmt: skip
    exp = prepare(load_config(None, overrides, model=f"random-{name}"))
    assert exp.trainable.kind == shape.kind
    embeddings = exp.trainable.model.get_input_embeddings()
    assert embeddings.num_embeddings == shape.sizes["vocab_size"]
    # encoders: query, key, value, three dense layers a block and the pooler's; causal: seven projections
    assert len(exp.trainable.factors) == 7
