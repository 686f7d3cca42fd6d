"""Privacy accounting on Opacus' RDP accountant: noise calibration before a run, epsilon spent during it.

DP-SGD: one accountant per client. A client's every optimiser step is one Gaussian mechanism with
noise multiplier sigma and sampling rate ``q_i = batch_size * gradient_accumulation_steps / n_i`` (n_i its
training questions), and it takes ``ceil(max_local_steps / gradient_accumulation_steps)`` of them in each
round it takes part in; its history grows only in those rounds, so epsilon is per client across all its
rounds. A last, shorter accumulation window is counted at the full rate (an upper bound).
Client-level DP: one accountant for the server; each round is one mechanism over the clients with
``q = clients per round / num_clients``.

Sampling: the accountant's rates assume Poisson sampling (Opacus' default). Our clients draw fixed-size
batches from a shuffled pass over their data and the server a fixed number of clients a round, the usual
practice that this accounting approximates (as Opacus does for shuffled, fixed-size batches).

A target ``dp_epsilon`` sets sigma before the run: for every client, the rounds it will take part in are
known from the seeded sampling, and Opacus calibrates a multiplier to its sampling rate and steps. By
default sigma is the largest of them, for every client, so no client's final epsilon exceeds the target;
``dp_noise_per_client`` gives each client its own (the same guarantee, each client at most the target,
with less noise for clients holding more data: under Dirichlet splits the smallest client otherwise sets
everyone's noise). ``dp_client_epsilon`` does the same for the
server's accountant over ``num_rounds`` rounds.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from fedsubspace.config import ExperimentConfig
from fedsubspace.errors import UserError
from fedsubspace.experiment import clients_per_round, sample_clients
from fedsubspace.privacy.client_dp import ClientLevelDP
from fedsubspace.privacy.dpsgd import ExampleLevelDP, window_count


def rounds_taken_part(config: ExperimentConfig) -> list[int]:
    """How many rounds each client will be sampled in (the seeded draw every runner makes)."""
    counts = [0] * config.num_clients
    for round_index in range(1, config.num_rounds + 1):
        for client in sample_clients(config.seed, round_index, config.num_clients, config.client_fraction):
            counts[client] += 1
    return counts


def dpsgd_sample_rates(config: ExperimentConfig, partition_sizes: list[int]) -> list[float]:
    """Each client's DP-SGD sampling rate: one optimiser step's questions over its training questions.

    A client holding fewer questions than one step takes would use a question twice in a step (its
    gradient would count twice, past the clip norm): refused before any work.
    """
    window = config.batch_size * config.gradient_accumulation_steps
    for client, size in enumerate(partition_sizes):
        if size < window:
            raise UserError(
                f"DP-SGD: client {client} holds {size} training questions, fewer than one optimiser step "
                f"takes (batch_size x gradient_accumulation_steps = {window}); lower them or raise "
                "min_partition_size"
            )
    return [window / size for size in partition_sizes]


def calibrated_noise_multiplier(
    option: str, epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Opacus' calibration of the noise multiplier to a target epsilon, with its two rough edges made plain.

    Its search opens at sigma = 20, where the best RDP order is nearly always the largest of Opacus'
    orders, and Opacus warns about that trial value on every call; the warning is kept for the result
    alone. A target below what the accountant can certify at any noise (its orders end at 63, which puts a
    floor under epsilon: 0.103 at delta 1e-5) is refused in one line, at once: Opacus' search would
    double sigma up to 1e6 first (a minute at sampling rate 0.5) and end in a ValueError.
    """
    alphas = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        floor, _ = get_privacy_spent(orders=alphas, rdp=[0.0] * len(alphas), delta=delta)  # sigma -> inf
        out_of_reach = UserError(
            f"{option}={epsilon:g} is out of reach at dp_delta={delta:g}: Opacus' RDP accountant "
            f"certifies no epsilon below {floor:.3f} there, whatever the noise; raise one of them"
        )
        if epsilon <= floor:
            raise out_of_reach
        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps
                )
            )
        except ValueError:  # a hair above the floor: no sigma up to Opacus' 1e6 reaches it
            raise out_of_reach from None
    _spent([(sigma, sample_rate, steps)], delta)  # Opacus warns here if the result's bound is loose
    return sigma


def example_level_dp(config: ExperimentConfig, partition_sizes: list[int]) -> ExampleLevelDP | None:
    """DP-SGD's settings for this run (None when off), the noise multiplier calibrated when a target
    epsilon is given."""
    if config.dp_max_grad_norm is None:
        return None
    rates = dpsgd_sample_rates(config, partition_sizes)
    if config.dp_noise_multiplier is not None:
        return ExampleLevelDP(config.dp_max_grad_norm, (config.dp_noise_multiplier,) * len(rates))
    assert config.dp_epsilon is not None  # validated: one of the two is set
    windows = window_count(config.max_local_steps, config.gradient_accumulation_steps)
    calibrated = {
        client: calibrated_noise_multiplier(
            "dp_epsilon", config.dp_epsilon, config.dp_delta, rate, rounds * windows
        )
        for client, (rate, rounds) in enumerate(zip(rates, rounds_taken_part(config), strict=True))
        if rounds > 0
    }
    largest = max(calibrated.values())
    if not config.dp_noise_per_client:
        return ExampleLevelDP(config.dp_max_grad_norm, (largest,) * len(rates))
    # a client never sampled never trains: its entry is never used, the largest keeps it on the safe side
    return ExampleLevelDP(
        config.dp_max_grad_norm, tuple(calibrated.get(client, largest) for client in range(len(rates)))
    )


def client_level_dp(config: ExperimentConfig) -> ClientLevelDP | None:
    """Client-level DP's settings for this run (None when off), calibrated when a target is given."""
    if config.dp_client_clip is None:
        return None
    k = clients_per_round(config.num_clients, config.client_fraction)
    sigma = config.dp_client_noise_multiplier
    if sigma is None:
        assert config.dp_client_epsilon is not None  # validated: one of the two is set
        sigma = calibrated_noise_multiplier(
            "dp_client_epsilon",
            config.dp_client_epsilon,
            config.dp_delta,
            k / config.num_clients,
            config.num_rounds,
        )
    return ClientLevelDP(clip=config.dp_client_clip, noise_multiplier=sigma, clients_per_round=k)


def _spent(history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


class PrivacyAccounts:
    """The run's accountants: one per client for DP-SGD, one for client-level DP. JSON-ready state."""

    def __init__(
        self,
        config: ExperimentConfig,
        dp: ExampleLevelDP | None,
        client_dp: ClientLevelDP | None,
        partition_sizes: list[int],
    ) -> None:
        self.delta, self.dp, self.client_dp = config.dp_delta, dp, client_dp
        self.rates = dpsgd_sample_rates(config, partition_sizes) if dp is not None else []
        self.windows = window_count(config.max_local_steps, config.gradient_accumulation_steps)
        self.server_rate = (client_dp.clients_per_round / config.num_clients) if client_dp else 0.0
        self.clients: dict[int, list[tuple[float, float, int]]] = {}
        self.server: list[tuple[float, float, int]] = []

    def record(self, trained: Iterable[int]) -> None:
        """One round: the clients in ``trained`` took their optimiser steps, the server released one sum."""
        if self.dp is not None:
            for client in trained:
                self.clients.setdefault(client, []).append(
                    (self.dp.noise_multipliers[client], self.rates[client], self.windows)
                )
        if self.client_dp is not None:
            self.server.append((self.client_dp.noise_multiplier, self.server_rate, 1))

    def metrics(self) -> dict[str, Any]:
        """Epsilon spent so far: every client that has trained (DP-SGD) and the server's (client-level)."""
        row: dict[str, Any] = {}
        if self.dp is not None:
            spent = {str(c): _spent(h, self.delta) for c, h in sorted(self.clients.items())}
            row["dp_epsilon"] = spent
            row["dp_epsilon_max"] = max(spent.values(), default=0.0)
        if self.client_dp is not None:
            row["dp_client_epsilon"] = _spent(self.server, self.delta)
        return row

    def summary(self) -> dict[str, Any]:
        """What summary.json records: the settings, the largest epsilon spent and delta."""
        spent = self.metrics()
        out: dict[str, Any] = {"dp_delta": self.delta}
        if self.dp is not None:
            out["dp_noise_multiplier"] = self.dp.largest_noise_multiplier
            if len(set(self.dp.noise_multipliers)) > 1:
                out["dp_noise_multipliers"] = list(self.dp.noise_multipliers)
            out["dp_epsilon_max"] = spent["dp_epsilon_max"]
        if self.client_dp is not None:
            out["dp_client_noise_multiplier"] = self.client_dp.noise_multiplier
            out["dp_client_epsilon"] = spent["dp_client_epsilon"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {str(c): h for c, h in self.clients.items()}, "server": self.server}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients = {int(c): [tuple(e) for e in h] for c, h in state["clients"].items()}
        self.server = [tuple(e) for e in state["server"]]
