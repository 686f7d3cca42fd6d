"""The paper's exact setup: its LoRA targets and gradient checkpointing, and 4-bit loading refused in one
line on a machine that cannot do it."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from helpers import ROOT, tiny

from fedsubspace import models
from fedsubspace.cli import main
from fedsubspace.client import client_context, run_round
from fedsubspace.configure import build_method
from fedsubspace.errors import UserError
from fedsubspace.experiment import local_schedule, prepare

PAPER = ROOT / "configs" / "paper"


@pytest.mark.parametrize(
    ("config", "targets"),
    [
        ("roberta-large-hellaswag.yaml", ["query", "key", "value", "dense"]),
        (
            "smollm-360m-hellaswag.yaml",
            ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
        ),
    ],
)
def test_paper_configs_carry_the_paper_codes_targets_and_checkpointing(
    config: str, targets: list[str]
) -> None:
    values = yaml.safe_load((PAPER / config).read_text())
    assert values["target_modules"] == targets
    assert values["gradient_checkpointing"] is True


def test_cpu_configs_say_which_targets_they_use() -> None:
    for path in sorted((ROOT / "configs" / "cpu").glob("*.yaml")):
        assert "# LoRA targets:" in path.read_text(), path


def one_client_round(*overrides: str) -> tuple[torch.nn.Module, dict]:
    config = tiny("tiny-encoder", "subspace_reg", "lora_dropout=0.1", *overrides)
    exp = prepare(config)
    rule = build_method(config)
    update = run_round(exp, rule, local_schedule(config), exp.initial_state, client_context(exp, 0, 1)).update
    return exp.trainable.model, {
        **update.head,
        **{f"{n}/{i}": t for n, p in update.factors.items() for i, t in enumerate(p)},
    }


def test_gradient_checkpointing_is_off_by_default_and_gives_the_same_update() -> None:
    plain_model, plain = one_client_round()
    checkpointed_model, checkpointed = one_client_round("gradient_checkpointing=true")
    assert not plain_model.get_submodule("base_model.model").is_activation_checkpointing
    assert checkpointed_model.get_submodule("base_model.model").is_activation_checkpointing
    assert plain.keys() == checkpointed.keys()
    for name, tensor in plain.items():
        # the recomputed forward replays the dropout masks: the same arithmetic up to summation order
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert any(t.abs().sum() > 0 for t in plain.values())


def test_load_in_4bit_without_bitsandbytes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA machine without bitsandbytes (simulated: this one has neither)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match=r"^load_in_4bit needs bitsandbytes: pip install bitsandbytes$"):
        models.validate_quantization(True, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_paper_causal_config_is_refused_in_one_line_without_a_gpu(tmp_path, capsys) -> None:
    code = main(["run", "--config", str(PAPER / "smollm-360m-hellaswag.yaml"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "fedsubspace: error: load_in_4bit needs a CUDA GPU; this machine has none"


def test_merged_eval_with_4bit_weights_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine where 4-bit loading would work (simulated), merging into 4-bit weights is refused."""
    monkeypatch.setattr(models, "validate_quantization", lambda load_in_4bit, device: None)
    with pytest.raises(UserError, match=r"^merged_eval cannot merge adapters into 4-bit weights exactly"):
        tiny("tiny-encoder", "fedavg", "load_in_4bit=true", "merged_eval=true")
