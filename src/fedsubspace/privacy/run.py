"""A run's privacy, as both runners' server side uses it: the settings, the accountants, the noise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedsubspace.config import ExperimentConfig
from fedsubspace.methods import Method
from fedsubspace.privacy.accounting import PrivacyAccounts, client_level_dp, example_level_dp
from fedsubspace.privacy.client_dp import ClientLevelDP, noisy_mean_update
from fedsubspace.privacy.dpsgd import ExampleLevelDP
from fedsubspace.seeding import CLIENT_DP_NOISE, stream_seed
from fedsubspace.state import ClientUpdate, GlobalState


@dataclass
class RunPrivacy:
    """DP-SGD's settings for the clients, client-level DP's for the server, and their accountants."""

    dp: ExampleLevelDP | None
    client_dp: ClientLevelDP | None
    accounts: PrivacyAccounts
    seed: int

    @classmethod
    def of(cls, config: ExperimentConfig, partition_sizes: list[int]) -> RunPrivacy | None:
        """The run's privacy (None when the config asks for none), calibrated before any training."""
        dp, client_dp = example_level_dp(config, partition_sizes), client_level_dp(config)
        if dp is None and client_dp is None:
            return None
        return cls(dp, client_dp, PrivacyAccounts(config, dp, client_dp, partition_sizes), config.seed)

    def to_aggregate(
        self,
        method: Method,
        state: GlobalState,
        updates: list[ClientUpdate],
        weights: list[float],
        round_index: int,
    ) -> tuple[list[ClientUpdate], list[float]]:
        """What the method aggregates: the updates as they are, or under client-level DP one noisy mean."""
        if self.client_dp is None:
            return updates, weights
        generator = torch.Generator().manual_seed(stream_seed(self.seed, CLIENT_DP_NOISE, round_index))
        return [noisy_mean_update(method, state, updates, self.client_dp, generator)], [1.0]

    def record(self, trained: Iterable[int]) -> None:
        self.accounts.record(trained)

    def metrics(self) -> dict[str, Any]:
        return self.accounts.metrics()

    def summary(self) -> dict[str, Any]:
        return self.accounts.summary()
