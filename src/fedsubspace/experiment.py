"""What every runner prepares before round 1: data, partitions, the model with its adapter, encodings.

Shared by the in-process simulation and the Flower apps, so both start from identical objects for a
given config and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsubspace.client import LocalSchedule, TrainableModel, stream_seed
from fedsubspace.config import ExperimentConfig
from fedsubspace.data import FieldMap, load_multiple_choice, partition_indices, partition_stats
from fedsubspace.methods import MethodOptions
from fedsubspace.models import (
    add_lora,
    head_parameters,
    load_model,
    lora_parameters,
    lora_scaling,
    resolve_device,
)
from fedsubspace.scoring import Encoded, encode
from fedsubspace.state import GlobalState


@dataclass
class Experiment:
    config: ExperimentConfig
    trainable: TrainableModel
    train: Encoded
    eval: Encoded
    partitions: list[list[int]]
    partition_stats: dict
    initial_state: GlobalState


def method_options(config: ExperimentConfig) -> MethodOptions:
    return MethodOptions(
        mu=config.mu,
        alpha=config.alpha,
        lambda_reg=config.lambda_reg,
        max_update_norm=config.max_update_norm,
        preserve_norm=config.preserve_norm,
    )


def local_schedule(config: ExperimentConfig) -> LocalSchedule:
    return LocalSchedule(
        max_local_steps=config.max_local_steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )


def prepare(config: ExperimentConfig) -> Experiment:
    fields = FieldMap(
        context=config.context_field,
        choices=config.choices_field,
        label=config.label_field,
        group=config.partition_field,
    )
    train = load_multiple_choice(
        config.dataset, config.train_split, fields, limit=config.max_train_samples, seed=config.seed
    )
    evaluation = load_multiple_choice(
        config.dataset, config.eval_split, fields, limit=config.max_eval_samples, seed=config.seed
    )
    partitions = partition_indices(
        train,
        config.num_clients,
        scheme=config.partition,
        by="group",
        alpha=config.dirichlet_alpha,
        min_partition_size=config.min_partition_size,
        seed=config.seed,
    )
    device = resolve_device(config.device)
    loaded = load_model(
        config.model,
        config.model_kind,
        dtype=config.dtype,
        device=config.device,
        seed=config.seed,
        load_in_4bit=config.load_in_4bit,
    )
    peft_model = add_lora(
        loaded.model,
        loaded.kind,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules or loaded.target_modules,
        seed=config.seed,
    )
    factors = {name: (B, A) for name, (A, B) in lora_parameters(peft_model).items()}
    trainable = TrainableModel(
        model=peft_model, kind=loaded.kind, factors=factors, head=head_parameters(peft_model), device=device
    )
    init_factors, init_head = trainable.snapshot()
    initial_state = GlobalState(factors=init_factors, head=init_head, scaling=lora_scaling(peft_model))
    return Experiment(
        config=config,
        trainable=trainable,
        train=encode(train, loaded.tokenizer, loaded.kind, config.max_length),
        eval=encode(evaluation, loaded.tokenizer, loaded.kind, config.max_length),
        partitions=partitions,
        partition_stats=partition_stats(
            train, partitions, by="group", scheme=config.partition, alpha=config.dirichlet_alpha
        ),
        initial_state=initial_state,
    )


def sample_clients(seed: int, round_index: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of one round: a seeded draw that depends only on (seed, round), never on the engine."""
    count = max(1, round(fraction * num_clients))
    generator = torch.Generator().manual_seed(stream_seed(seed, 0, round_index))
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())
