"""One LoRA adapter per client rank on one model: seeded creation, the parameter maps, switching ranks."""

from __future__ import annotations

import pytest
import torch

from fedsubspace.adapters import LoraSpec, TrainableModel, adapt, lora_parameters
from fedsubspace.models import load_model


def _adapted(name: str, ranks: list[int], seed: int = 3) -> TrainableModel:
    loaded = load_model(name, None, device="cpu")
    spec = LoraSpec(
        ranks=ranks,
        alpha=8.0,
        dropout=0.0,
        target_modules=loaded.target_modules,
        modules_to_save=loaded.head_modules,
        seed=seed,
    )
    return adapt(loaded.model, loaded.kind, spec, device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-causal"])
def test_every_rank_gets_an_adapter_mapped_under_base_model_names(name: str) -> None:
    tm = _adapted(name, [4, 2, 2, 1])
    head = {"classifier.weight", "classifier.bias"} if name == "tiny-encoder" else set()
    assert sorted(tm.adapters) == [1, 2, 4]
    assert tm.active == tm.global_rank == 4
    assert tm.model.active_adapter == "default"
    base_model = tm.model.get_base_model()
    for module, weight in tm.base.items():
        assert weight is base_model.get_parameter(f"{module}.base_layer.weight")  # the frozen W, not a copy
        assert not weight.requires_grad
    for rank, adapter in tm.adapters.items():
        assert adapter.scaling == 8.0 / rank
        assert set(adapter.factors) == set(tm.base)
        for module, (B, A) in adapter.factors.items():
            assert B.shape == (tm.base[module].shape[0], rank)
            assert A.shape == (rank, tm.base[module].shape[1])
        assert set(adapter.head) == head
    for name_ in head:  # PEFT keeps a copy of the head per adapter
        assert len({id(tm.adapters[r].head[name_]) for r in (1, 2, 4)}) == 3


def test_activate_switches_the_model_to_the_rank_s_adapter() -> None:
    tm = _adapted("tiny-encoder", [4, 2])
    adapter = tm.activate(2)
    assert adapter is tm.adapters[2] and tm.factors is tm.adapters[2].factors
    assert tm.model.active_adapter == "rank2"
    ids = {module: id(A) for module, (A, _) in lora_parameters(tm.model).items()}
    assert ids == {module: id(A) for module, (_, A) in tm.factors.items()}
    tm.activate(4)
    assert tm.model.active_adapter == "default"


def test_a_rank_s_initial_adapter_does_not_depend_on_the_other_ranks() -> None:
    """Each smaller rank draws from a stream of its own, in a fork: the global RNG does not move."""
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    small = _adapted("tiny-encoder", [4, 2])
    assert torch.equal(torch.random.get_rng_state(), before)
    more = _adapted("tiny-encoder", [4, 2, 1])
    for rank in (2, 4):
        for module, (B, A) in small.adapters[rank].factors.items():
            assert torch.equal(A, more.adapters[rank].factors[module][1])
            assert torch.equal(B, torch.zeros_like(B))
    A_global = next(iter(small.adapters[4].factors.values()))[1]
    A_rank2 = next(iter(small.adapters[2].factors.values()))[1]
    assert not torch.equal(A_global[:2], A_rank2)
    alone = _adapted("tiny-encoder", [2])  # rank 2 as the global adapter: drawn from the seed itself
    assert not torch.equal(A_rank2, next(iter(alone.adapters[2].factors.values()))[1])
    other_seed = _adapted("tiny-encoder", [4, 2], seed=4)
    assert not torch.equal(A_rank2, next(iter(other_seed.adapters[2].factors.values()))[1])
