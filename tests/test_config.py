"""Configs and user mistakes: every config the repository ships, paths relative to a config, client
ranks and method options validated, and every mistake ending in one line with exit status 2."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from helpers import FIXTURE, ROOT

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.config import client_ranks
from fedsubspace.configure import build_config, load_config
from fedsubspace.errors import UserError
from fedsubspace.results import read_metrics


def test_a_config_names_its_data_relative_to_its_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "experiment"
    folder.mkdir()
    shutil.copytree(FIXTURE, folder / "data")
    text = (ROOT / "configs" / "tiny-encoder.yaml").read_text().replace("../tests/fixtures/hellaswag", "data")
    (folder / "config.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    assert load_config(Path("experiment/config.yaml")).dataset == "experiment/data"
    assert load_config(folder / "config.yaml").dataset == str(folder / "data")
    # the repository's configs, from its root, resolve to what runs wrote before (so --resume compares equal)
    monkeypatch.chdir(ROOT)
    assert load_config(Path("configs/tiny-encoder.yaml")).dataset == "tests/fixtures/hellaswag"
    assert load_config(Path("configs/cpu/minilm-l6-hellaswag.yaml")).dataset == "hellaswag"  # registered
    simulation.run(load_config(folder / "config.yaml", ["num_rounds=1"]), tmp_path / "run", progress=False)
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1]


CONFIG = ROOT / "configs" / "tiny-encoder.yaml"


RUN = ["run", "--config", str(CONFIG), "--out", "{tmp}/x", "--set", f"dataset={FIXTURE}", "--quiet"]


def _choices(text: str, keep: int) -> bytes:
    """The fixture's questions with ``keep`` endings each (the correct one kept first)."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    cut = [{**r, "endings": [r["endings"][r["label"]], *r["endings"]][:keep], "label": 0} for r in rows]
    return "".join(json.dumps(r) + "\n" for r in cut).encode()


THREE_CHOICES = {
    "data/train.jsonl": (FIXTURE / "train.jsonl").read_bytes(),
    "data/validation.jsonl": _choices((FIXTURE / "validation.jsonl").read_text(), 3),
}


# (files written under the test's directory first, the command line with {tmp} for that directory, what the
# one line says). The files are left as they were: a mistake never costs the user a file.
MISTAKES = [
    ({}, [*RUN, "--method", "nope"], "unknown method 'nope'"),
    ({}, [*RUN, "--set", "num_round=3"], "unknown config key 'num_round' (did you mean 'num_rounds'?)"),
    ({}, [*RUN, "--set", "client_fraction=1.5"], "client_fraction must be in (0, 1]"),
    ({}, [*RUN, "--set", "learning_rate=fast"], "config key 'learning_rate' must be float"),
    ({}, [*RUN, "--set", "model=no-such-preset"], "unknown model 'no-such-preset'"),
    ({}, [*RUN, "--set", "load_in_4bit=true", "--set", "device=cpu"], "load_in_4bit"),
    ({}, [*RUN, "--set", "dataset=/nonexistent/data"], "/nonexistent/data"),
    ({}, [*RUN, "--set", "num_clients=200", "--set", "partition=iid"], "client"),
    # a run that cannot train is refused before it starts
    ({}, [*RUN, "--set", "learning_rate=.inf"], "config key 'learning_rate' must be a finite number"),
    ({}, [*RUN, "--set", "dtype=float16", "--set", "device=cpu"], "dtype float16 trains on a GPU only"),
    # no config, an empty one: never the 20-round default experiment
    ({}, ["run", "--out", "{tmp}/x", "--set", f"dataset={FIXTURE}", "--set", "num_rounds=1"],
     "--config FILE is required"),
    ({"empty.yaml": b"# nothing set\n"}, [*RUN, "--config", "{tmp}/empty.yaml"], "empty.yaml is empty"),
    ({"twice.yaml": b"num_rounds: 1\nnum_rounds: 2\n"}, [*RUN, "--config", "{tmp}/twice.yaml"],
     "line 2: key 'num_rounds' is given twice"),
    ({}, [*RUN, "--resume"], "x holds no run to resume; drop --resume"),
    (THREE_CHOICES, [*RUN, "--set", "dataset={tmp}/data"], "have 4 choices but evaluation ones 3"),
    # the user's own config.yaml is never taken over, even with --overwrite
    ({"x/config.yaml": b"learning_rate: 5e-4\n"}, RUN, "x/config.yaml is not one fedsubspace wrote"),
    ({"x/config.yaml": b"learning_rate: 5e-4\n"}, [*RUN, "--overwrite"], "is not one fedsubspace wrote"),
    # OS and parse errors: one line naming the file
    ({"latin1.yaml": "num_rounds: 1 # \u00e9\n".encode("latin-1")}, [*RUN, "--config", "{tmp}/latin1.yaml"],
     "latin1.yaml is not UTF-8 text"),
    ({}, [*RUN, "--config", "{tmp}"], "is a directory; --config takes a YAML config file"),
    ({"file": b"mine\n"}, [*RUN, "--out", "{tmp}/file"], "file is a file where a directory is needed"),
    ({}, [*RUN, "--out", "{tmp}/" + "a" * 300], "a path component is over 255 characters"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "argv", "message"), MISTAKES)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, capsys, files, argv, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_a_results_directory_it_may_not_write_is_one_line(tmp_path, capsys, monkeypatch):
    # root (who runs the tests here) may write into a read-only directory: the refusal is made as the
    # operating system makes it
    out, real = tmp_path / "read-only" / "x", Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main([arg.replace("{tmp}/x", str(out)) for arg in RUN]) == 2
    err = capsys.readouterr().err
    assert f"{out}: permission denied" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "configs"))
)
def test_every_config_the_repository_ships_is_valid(path):
    # 4-bit loading is checked against the machine (it needs CUDA): here, everything else in the file
    assert load_config(path, ["load_in_4bit=false"]).model


def test_missing_config_file_is_a_user_error(capsys):
    assert main(["run", "--config", "/nonexistent.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_methods_that_cannot_serve_mixed_ranks_refuse_them_at_validation(tmp_path, capsys):
    base = {"dataset": str(FIXTURE), "num_clients": 4}
    for method in ("fedavg", "svd", "fedsvd", "subspace_reg", "fedrot", "ffa", "fedex", "fedsa", "rolora"):
        with pytest.raises(UserError, match="cannot serve mixed client_ranks") as err:
            build_config({**base, "method": method, "client_ranks": "cycle(4,8)"})
        assert "flexlora" in str(err.value) and "glora" in str(err.value) and "\n" not in str(err.value)
    # equal ranks are no mix: every method accepts them
    build_config({**base, "method": "fedavg", "client_ranks": [4, 4, 4, 4]})
    code = main(["run", "--config", str(ROOT / "configs/tiny-encoder.yaml"), "--out", str(tmp_path / "x"),
                 "--set", f"dataset={FIXTURE}", "--set", "client_ranks=cycle(2,4)", "--method", "fedavg",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "method 'fedavg' cannot serve mixed client_ranks; methods that can: fedgalore, flexlora" in err


def test_client_ranks_rules_and_mistakes():
    base = {"dataset": str(FIXTURE), "num_clients": 5, "method": "hetlora"}
    assert client_ranks(build_config({**base, "client_ranks": "cycle(4, 8,16)"})) == [4, 8, 16, 4, 8]
    assert client_ranks(build_config({**base, "client_ranks": [1, 2, 3, 4, 5]})) == [1, 2, 3, 4, 5]
    assert client_ranks(build_config({**base, "lora_rank": 6})) == [6] * 5
    for value, message in [
        ("cycle()", "client_ranks must list one rank per client or be cycle(r1,r2,...)"),
        ("4,8", "client_ranks must list one rank per client"),
        ([4, 8], "client_ranks lists 2 ranks but num_clients is 5"),
        ([4, 8, 0, 1, 2], "client_ranks must all be at least 1"),
        ([4, 8, 1.5, 1, 2], "config key 'client_ranks' must be"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_config({**base, "client_ranks": value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fedrot_lam", 1.5, "fedrot_lam must be in [0, 1]"),
        ("fedrot_align", "C", "fedrot_align must be alternate, A or B"),
        ("glora_server_rank", "all", "glora_server_rank must be a positive integer, union"),
        ("glora_server_rank", 0, "glora_server_rank must be a positive integer, union"),
        ("fedgalore_angle_threshold", 0, "fedgalore_angle_threshold must be in (0, 90]"),
        ("holdout_fraction", 1.0, "holdout_fraction must be in (0, 1)"),
    ],
)
def test_new_method_options_are_validated(key, value, message):
    with pytest.raises(UserError) as err:
        build_config({"dataset": str(FIXTURE), key: value})
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("native", "overrides", "told"),
    [
        (False, ["autocast=bfloat16"], "computes each product with float32 kernels"),
        (False, ["dtype=bfloat16"], "weights compute about 50x slower"),
        (False, [], None),  # float32: nothing to say
        (True, ["autocast=bfloat16"], None),  # the CPU has the kernels
        (True, ["dtype=bfloat16"], None),
    ],
)
def test_bfloat16_on_a_cpu_without_its_kernels_is_told_once(monkeypatch, caplog, native, overrides, told):
    from fedsubspace import autocast
    from fedsubspace.models import loading

    monkeypatch.setattr(autocast, "native_bfloat16", lambda: native)
    loading.warn_slow_bfloat16.cache_clear()
    loading.note_emulated_bfloat16_autocast.cache_clear()
    for _ in range(3):  # a matrix validates each run's config: one line a process
        load_config(CONFIG, ["device=cpu", *overrides])
    lines = [r.getMessage() for r in caplog.records if "no bfloat16 matrix kernels" in r.getMessage()]
    assert len(lines) == (0 if told is None else 1)
    assert told is None or told in lines[0]
    loading.warn_slow_bfloat16.cache_clear()
    loading.note_emulated_bfloat16_autocast.cache_clear()
