"""Fixtures the test modules share (helpers.py holds the plain functions)."""

from __future__ import annotations

import json

import pytest

from fedsubspace import experiment, simulation
from fedsubspace.flower import server_app


@pytest.fixture
def one_experiment_per_config(monkeypatch) -> None:
    """The in-process run, the ServerApp and the ClientApps of a test share one prepared experiment,
    as the in-process runner's server and clients do (every use reloads the weights it needs); the
    real-process tests below keep them apart."""
    cache: dict[str, experiment.Experiment] = {}
    real = experiment.prepare

    def prepare(config):
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in cache:
            cache[key] = real(config)
        return cache[key]

    for module in (experiment, simulation, server_app):
        monkeypatch.setattr(module, "prepare", prepare)
