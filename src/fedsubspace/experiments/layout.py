"""Where a matrix keeps its runs, which runs the report compares (by their resolved configs, never by
their paths), and reading them back (through :mod:`fedsubspace.results`).

``OUT/<setup>/<label>/seed<seed>/``: the setup is the config file's stem, the label a method name or
``centralized`` (the reference run of one client holding all the data). ``OUT/report/`` holds the
report. ``initial`` (the model before training) is a reference row of the report, not a directory: it
comes from the runs' summaries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsubspace.configure import with_defaults
from fedsubspace.errors import UserError
from fedsubspace.results import CONFIG, ERROR, Status, read_config, read_metrics, read_summary, status

CENTRALIZED = "centralized"
INITIAL = "initial"
REPORT = "report"
_SEED_DIR = re.compile(r"seed(-?\d+)")
# What tells a run's protocol apart from another's: all its resolved config but the seed (and, between
# the methods of one setup, the method).
# ``tracker`` only says where a run mirrors its metrics, so it tells no protocol apart either.
_NOT_PROTOCOL = ("seed", "tracker")
_NOT_SETUP = (*_NOT_PROTOCOL, "method")
# The keys a centralized reference sets for itself (experiments.matrix.centralized_config): in every
# other key it equals the setup it is the reference of.
_REFERENCE_OWN = (
    "seed", "method", "num_clients", "client_fraction", "partition", "client_ranks", "lora_rank",
    "max_local_steps", "tags",
)  # fmt: skip


def run_path(out: Path, setup: str, label: str, seed: int) -> Path:
    return out / setup / label / f"seed{seed}"


def label(config: dict[str, Any]) -> str:
    """A run's row label, from its config: the centralized reference is tagged so by the matrix."""
    return CENTRALIZED if CENTRALIZED in (config.get("tags") or []) else str(config.get("method", "?"))


def layout_name(root: Path, path: Path) -> str:
    """The name the layout gives the setup of ``path``: the config stem of ``OUT/<setup>/<label>/seedN``,
    or for a directory laid out otherwise, its parent directory."""
    parts = path.relative_to(root).parts
    if len(parts) >= 3 and _SEED_DIR.fullmatch(parts[-1]):
        return "/".join(parts[:-2])
    return "/".join(parts[:-1]) or root.name


def _resolved(config: dict[str, Any], leave_out: tuple[str, ...]) -> dict[str, Any]:
    # a key a config file lacks (an older run's) has its default
    return {k: v for k, v in with_defaults(config).items() if k not in leave_out}


def _fingerprint(config: dict[str, Any], leave_out: tuple[str, ...]) -> str:
    return json.dumps(_resolved(config, leave_out), sort_keys=True, default=str)


@dataclass
class RunRecord:
    """One results directory as the report sees it."""

    path: Path
    setup: str
    label: str  # the method, or CENTRALIZED
    seed: int
    num_rounds: int
    status: Status
    rows: list[dict[str, Any]]  # metrics.jsonl, one a round
    summary: dict[str, Any] | None  # finished runs only
    error: str | None  # failed runs: the first line of error.txt

    @property
    def global_evaluation(self) -> bool:
        """Evaluated on the shared evaluation split (personalised methods use each client's own data)."""
        return self.summary is not None and self.summary.get("evaluation", "global") == "global"


def _read(path: Path, config: dict[str, Any], setup: str) -> RunRecord:
    state = status(path)
    return RunRecord(
        path=path,
        setup=setup,
        label=label(config),
        seed=config.get("seed", 0),
        num_rounds=config.get("num_rounds", 0),
        status=state,
        rows=read_metrics(path),
        summary=read_summary(path) if state is Status.FINISHED else None,
        error=(path / ERROR).read_text(errors="replace").split("\n", 1)[0]
        if state is Status.FAILED
        else None,
    )


def _setups(names: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """Each run's setup: runs are compared only when their resolved configs are equal but for the seed
    (and, between methods, the method), never because of where they lie. A layout name whose federated
    runs hold one setup keeps its name; otherwise its setups are named apart by the keys in which they
    differ. A centralized reference joins the one setup its config can come from (equal in every key
    the reference does not set for itself), or is named apart."""
    federated: dict[str, set[str]] = {}
    for name, config in zip(names, configs, strict=True):
        if label(config) != CENTRALIZED:
            federated.setdefault(name, set()).add(_fingerprint(config, _NOT_SETUP))

    def federated_setup(name: str, fingerprint: str) -> str:
        setups = federated[name]
        return name if len(setups) == 1 else f"{name} ({_difference(fingerprint, setups)})"

    references: dict[tuple[str, str], set[str]] = {}  # (name, setup) -> the reference protocols in it
    origin: dict[tuple[str, str], str] = {}  # (name, reference protocol) -> its setup
    for name, config in zip(names, configs, strict=True):
        if label(config) == CENTRALIZED:
            shared = _fingerprint(config, _REFERENCE_OWN)
            sources = [
                f for f in federated.get(name, ()) if _fingerprint(json.loads(f), _REFERENCE_OWN) == shared
            ]
            setup = federated_setup(name, sources[0]) if len(sources) == 1 else f"{name} ({CENTRALIZED})"
            protocol = _fingerprint(config, _NOT_PROTOCOL)
            references.setdefault((name, setup), set()).add(protocol)
            origin[(name, protocol)] = setup
    named = []
    for name, config in zip(names, configs, strict=True):
        if label(config) != CENTRALIZED:
            named.append(federated_setup(name, _fingerprint(config, _NOT_SETUP)))
            continue
        protocol = _fingerprint(config, _NOT_PROTOCOL)
        setup = origin[(name, protocol)]
        protocols = references[(name, setup)]
        named.append(setup if len(protocols) == 1 else f"{setup} ({_difference(protocol, protocols)})")
    return named


def _difference(fingerprint: str, fingerprints: set[str]) -> str:
    """The keys (and values) by which one resolved config differs from the others: all of them, so that
    two setups never share a name."""
    mine = json.loads(fingerprint)
    others = [json.loads(other) for other in fingerprints if other != fingerprint]
    return ", ".join(
        f"{key}={value}" for key, value in mine.items() if any(o.get(key) != value for o in others)
    )


def collect(root: Path) -> list[RunRecord]:
    """Every results directory (a directory holding config.yaml) under ``root``, in path order."""
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    paths = [
        file.parent
        for file in sorted(root.rglob(CONFIG))
        if REPORT not in file.parent.relative_to(root).parts[:1]
    ]
    if not paths:
        raise UserError(f"no results directories (holding config.yaml) under {root}")
    configs = [read_config(path) for path in paths]
    setups = _setups([layout_name(root, path) for path in paths], configs)
    return [_read(path, config, setup) for path, config, setup in zip(paths, configs, setups, strict=True)]
