"""What every runner prepares before round 1: data, partitions, the model with its adapters, encodings.

Shared by the in-process simulation and the Flower apps, so both start from identical objects for a
given config and seed. Clients may have different LoRA ranks (``client_ranks``): the model then carries
one PEFT adapter per distinct rank (all sharing the frozen weights), the largest one, the global rank,
being the adapter of the global model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedsubspace.adapters import LoraSpec, TrainableModel, adapt
from fedsubspace.config import ExperimentConfig, client_ranks
from fedsubspace.data import partition_indices, partition_stats
from fedsubspace.errors import UserError
from fedsubspace.methods import METHODS, LocalSchedule
from fedsubspace.models import LoadedModel, load_model, resolve_device
from fedsubspace.scoring import Encoded
from fedsubspace.seeding import HOLDOUT, SAMPLING, stream_seed
from fedsubspace.state import GlobalState
from fedsubspace.tasks import TASKS


@dataclass
class Experiment:
    config: ExperimentConfig
    trainable: TrainableModel
    train: Encoded
    eval: Encoded
    partitions: list[list[int]]  # each client's training examples (indices into ``train``)
    partition_stats: dict
    initial_state: GlobalState
    client_ranks: list[int]
    # Personalised methods: each client's held-out questions (taken out of its partition), else None.
    holdouts: list[Encoded] | None = None


def eval_seed(config: ExperimentConfig) -> int:
    """The seed of the evaluation subsample: ``eval_seed``, or the run's seed when that is null."""
    return config.seed if config.eval_seed is None else config.eval_seed


def local_schedule(config: ExperimentConfig) -> LocalSchedule:
    return LocalSchedule(
        max_local_steps=config.max_local_steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )


def lora_spec(config: ExperimentConfig, loaded: LoadedModel, ranks: list[int]) -> LoraSpec:
    """The adapters ``config`` puts on ``loaded``: one per client rank in ``ranks``."""
    return LoraSpec(
        ranks=ranks,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules or loaded.target_modules,
        modules_to_save=loaded.head_modules,
        seed=config.seed,
    )


def split_holdouts(
    partitions: list[list[int]], fraction: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each partition split into (train, held out) with ``round(fraction * n)`` (at least one) held out."""
    train, held_out = [], []
    for client, indices in enumerate(partitions):
        if len(indices) < 2:
            raise UserError(
                f"client {client} has {len(indices)} example(s): personalised evaluation needs at least 2; "
                "raise min_partition_size"
            )
        order = np.random.default_rng(stream_seed(seed, HOLDOUT, client)).permutation(len(indices))
        count = min(len(indices) - 1, max(1, round(fraction * len(indices))))
        held_out.append(sorted(indices[i] for i in order[:count]))
        train.append(sorted(indices[i] for i in order[count:]))
    return train, held_out


def subset(encoded: Encoded, indices: list[int]) -> Encoded:
    """The questions ``indices`` of ``encoded`` (a client's held-out slice)."""

    def pick(rows: list | None) -> list | None:
        return None if rows is None else [rows[i] for i in indices]

    return dataclasses.replace(
        encoded,
        labels=[encoded.labels[i] for i in indices],
        input_ids=pick(encoded.input_ids),
        token_type_ids=pick(encoded.token_type_ids),
        context_ids=pick(encoded.context_ids),
        ending_ids=pick(encoded.ending_ids),
    )


def load_eval_split(config: ExperimentConfig) -> datasets.Dataset:
    """The evaluation questions of ``config`` (the same ones for a run and for ``fedsubspace eval``)."""
    return TASKS[config.task].load(config, config.eval_split, config.max_eval_samples, eval_seed(config))


def encode_split(
    config: ExperimentConfig, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, kind: str
) -> Encoded:
    """``dataset``'s examples as token ids, as ``config``'s task encodes them."""
    return TASKS[config.task].encode(dataset, tokenizer, kind, config)


def prepare(config: ExperimentConfig) -> Experiment:
    task = TASKS[config.task]
    train = task.load(config, config.train_split, config.max_train_samples, config.seed)
    evaluation = load_eval_split(config)
    task.check_splits(train, evaluation, config)
    partitions = partition_indices(
        train,
        config.num_clients,
        scheme=config.partition,
        by="group",
        alpha=config.dirichlet_alpha,
        min_partition_size=config.min_partition_size,
        seed=config.seed,
    )
    method = METHODS[config.method]
    holdouts = None
    if method.personalised:
        partitions, holdouts = split_holdouts(partitions, config.holdout_fraction, config.seed)
    device = resolve_device(config.device)
    loaded = load_model(
        config.model,
        config.model_kind,
        dtype=config.dtype,
        device=config.device,
        seed=config.seed,
        load_in_4bit=config.load_in_4bit,
        target_modules=config.target_modules,
        gradient_checkpointing=config.gradient_checkpointing,
        encoder_head=task.encoder_head(config),
    )
    ranks = client_ranks(config)
    trainable = adapt(
        loaded.model,
        loaded.kind,
        lora_spec(config, loaded, ranks),
        device=device,
        keep_pristine=method.merges_into_base,
        autocast=config.autocast,
    )
    init_factors, init_head = trainable.snapshot()
    initial_state = GlobalState(factors=init_factors, head=init_head, scaling=trainable.adapter.scaling)
    encoded_train = task.encode(train, loaded.tokenizer, loaded.kind, config)
    return Experiment(
        config=config,
        trainable=trainable,
        train=encoded_train,
        eval=task.encode(evaluation, loaded.tokenizer, loaded.kind, config),
        partitions=partitions,
        partition_stats=partition_stats(
            train, partitions, by="group", scheme=config.partition, alpha=config.dirichlet_alpha
        ),
        initial_state=initial_state,
        client_ranks=ranks,
        holdouts=None if holdouts is None else [subset(encoded_train, h) for h in holdouts],
    )


def clients_per_round(num_clients: int, fraction: float) -> int:
    return max(1, round(fraction * num_clients))


def sample_clients(seed: int, round_index: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of one round: a seeded draw that depends only on (seed, round), never on the engine."""
    count = clients_per_round(num_clients, fraction)
    generator = torch.Generator().manual_seed(stream_seed(seed, SAMPLING, round_index))
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())
