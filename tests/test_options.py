"""Method hyperparameters: each method declares its own, the config reads them from the registry, and the
config layer imports nothing above it."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys

import pytest
from helpers import FIXTURE, ROOT

from fedsubspace.cli import main
from fedsubspace.config import CORE_KEYS
from fedsubspace.configure import build_config, build_method, defaults
from fedsubspace.errors import UserError
from fedsubspace.flower.settings import FlowerSettings
from fedsubspace.methods import METHODS, declared_options, get_method
from fedsubspace.methods.base import Method, register
from fedsubspace.methods.options import MAX_UPDATE_NORM, Option
from fedsubspace.methods.privacy import summed_upload

# What each method reads, as the config keys it had before the options moved into the methods' files.
READS = {
    "svd": {"max_update_norm": None, "preserve_norm": True},
    "fedsvd": {"max_update_norm": None},
    "subspace_reg": {
        "mu": 0.05,
        "alpha": 0.01,
        "lambda_reg": 1e-5,
        "max_update_norm": None,
        "preserve_norm": True,
        "subspace_reg_split": "orthonormal",
    },
    "fedrot": {"fedrot_lam": 1.0, "fedrot_align": "alternate"},
    "glora": {"glora_server_rank": None},
    "fedgalore": {"fedgalore_angle_threshold": 60.0},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_its_options_with_a_default_and_a_meaning(name):
    options = METHODS[name].Options
    fields = dataclasses.fields(options)
    assert {f.name: f.default for f in fields} == READS.get(name, {})
    for f in fields:
        declared = f.metadata["option"]
        assert isinstance(declared, Option) and declared.default == f.default and declared.doc
    # a method built without options has its defaults, and the config writes each of them at its default
    assert get_method(name).options == options()
    assert READS.get(name, {}).items() <= defaults().items()


def test_the_config_keys_are_the_core_ones_and_every_methods_and_nothing_else():
    assert set(defaults()) == set(CORE_KEYS) | set(declared_options())
    assert not set(CORE_KEYS) & set(declared_options())


def test_a_shared_option_is_one_declaration_and_a_copy_is_refused():
    assert declared_options()["max_update_norm"].methods == ("fedsvd", "subspace_reg", "svd")
    for name in ("fedsvd", "subspace_reg", "svd"):
        (shared,) = [f for f in dataclasses.fields(METHODS[name].Options) if f.name == "max_update_norm"]
        assert shared.metadata["option"] is MAX_UPDATE_NORM

    @dataclasses.dataclass(frozen=True)
    class CopiedOptions:
        max_update_norm: float | None = Option(None, "a copy of the shared declaration").field()

    class Copier(Method):
        name = "copier"
        privacy = summed_upload("nothing")
        Options = CopiedOptions

        def aggregate(self, state, updates, weights):
            return state

    with pytest.raises(TypeError, match="declares option 'max_update_norm' again"):
        register(Copier)
    assert "copier" not in METHODS


def test_a_method_receives_only_its_own_options():
    config = build_config({"method": "fedrot", "fedrot_lam": 0.5, "mu": 0.2, "preserve_norm": False})
    method = build_method(config)
    assert dataclasses.asdict(method.options) == {"fedrot_lam": 0.5, "fedrot_align": "alternate"}
    assert (
        build_method(build_config({"method": "fedsvd", "max_update_norm": 2})).options.max_update_norm == 2.0
    )
    assert build_method(build_config({"method": "flora", "seed": 7})).seed == 7
    # other methods' keys are left alone; a key no method has is a mistake
    assert get_method("fedavg", {"mu": 0.3}).options == METHODS["fedavg"].Options()
    with pytest.raises(ValueError, match="no method has an option 'preserve_nrom'"):
        get_method("svd", {"preserve_nrom": False})


def test_old_configs_load_with_every_method_option_at_its_default():
    written = {
        k: v for k, v in defaults().items() if k not in ("fedgalore_angle_threshold", "glora_server_rank")
    }
    config = build_config(written)
    assert config.to_dict() == defaults()
    assert config.method_options["fedgalore_angle_threshold"] == 60.0


RUN = ["run", "--config", str(ROOT / "configs" / "tiny-encoder.yaml"), "--set", f"dataset={FIXTURE}",
       "--out", "{tmp}/x"]  # fmt: skip
MISTAKES = [
    (["fedrot_lamda=0.5"], "unknown config key 'fedrot_lamda' (did you mean 'fedrot_lam'?)"),
    (["fedrot_lam=1.5"], "fedrot_lam must be in [0, 1]"),
    (["fedrot_align=C"], "fedrot_align must be alternate, A or B"),
    (["subspace_reg_split=rescaled"], "subspace_reg_split must be orthonormal or paper_code"),
    (["glora_server_rank=0"], "glora_server_rank must be a positive integer, union, or null"),
    (["glora_server_rank=all"], "glora_server_rank must be a positive integer, union, or null"),
    (["fedgalore_angle_threshold=120"], "fedgalore_angle_threshold must be in (0, 90] degrees"),
    (["mu=-1"], "mu must not be negative"),
    (["lambda_reg=-1e-5"], "lambda_reg must not be negative"),
    (["max_update_norm=0"], "max_update_norm must be positive (or null to disable)"),
    (["preserve_norm=3"], "config key 'preserve_norm' must be bool, got 3"),
    (["alpha=.nan"], "config key 'alpha' must be a finite number"),
]


@pytest.mark.parametrize(("overrides", "message"), MISTAKES, ids=[m[0][0] for m in MISTAKES])
def test_a_bad_method_option_is_one_line_naming_the_key(tmp_path, capsys, overrides, message):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in RUN]
    assert main([*argv, *(arg for o in overrides for arg in ("--set", o))]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_method_options_in_a_flower_run_config():
    settings = FlowerSettings.from_run_config({"mu": 0.2, "glora_server_rank": "union", "method": "glora"})
    assert settings.config.method_options["mu"] == 0.2
    assert build_method(settings.config).options.glora_server_rank == "union"
    with pytest.raises(UserError, match="fedrot_lam must be in"):
        FlowerSettings.from_run_config({"fedrot_lam": 2.0})


CONFIG_PY = ROOT / "src" / "fedsubspace" / "config.py"


def test_config_imports_nothing_of_fedsubspace_above_it():
    imported = set()
    for node in ast.walk(ast.parse(CONFIG_PY.read_text())):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.startswith("fedsubspace")} == {"fedsubspace.errors"}
    # and importing it loads no model, method or torch
    code = "import json, sys, fedsubspace.config; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    assert {m for m in loaded if m.startswith("fedsubspace.")} == {"fedsubspace.config", "fedsubspace.errors"}
    assert "torch" not in loaded


def _options_table() -> str:
    rows = ["| key | default | read by | values | meaning |", "|---|---|---|---|---|"]
    for key, declared in declared_options().items():
        option = declared.option
        default = json.dumps(option.default).strip('"')
        values = option.check.expects if option.check else "must be true or false"  # preserve_norm
        doc = option.doc.replace("|", "\\|")  # a pipe would end the table cell
        rows.append(f"| `{key}` | `{default}` | {', '.join(declared.methods)} | {values} | {doc} |")
    return "\n".join(rows)


def test_the_readme_lists_every_method_option_as_declared():
    assert _options_table() in (ROOT / "README.md").read_text(), _options_table()
