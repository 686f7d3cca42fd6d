"""DP-SGD on a client: Opacus' per-example gradients, clipping and Gaussian noise around the local loop.

One :class:`PrivateGradients` serves one client round. It attaches Opacus' per-sample-gradient hooks
(:class:`opacus.grad_sample.GradSampleHooks`) to the model for the round and removes them after it; the
training loop calls :meth:`PrivateGradients.backward` instead of its own backward and
:meth:`PrivateGradients.release` at the end of each accumulation window, before the method's
regulariser and optimisers. ``release`` is Opacus' :class:`~opacus.optimizers.DPOptimizer` step without
its inner optimiser: each example's gradient of everything that trains (all the method's optimisers'
parameters together, so one clipping norm bounds the example's whole contribution) is clipped to
``max_grad_norm``, the clipped gradients are summed, Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added, and the sum is divided by the window's number of
examples. The method's optimisers then step on that gradient as they would on a plain one.

One example is one multiple-choice question or one sentence to classify. Opacus' hooks give one gradient
per row of every layer's input, and an example is ``rows_per_example`` consecutive rows (a question's
``num_choices`` rows: encoders score (B, C, L) as B * C sequences; one row under a sequence head), so the
rows of each example are summed into its gradient. Causal models are scored without the shared
context cache under DP-SGD: the cached path runs a question's context once (B rows) and its endings
from it (B * C rows), and the hooks would add the context pass's per-row gradients into the wrong rows
(measured on tiny-causal: per-question gradients 32-44% off the true ones; the uncached path agrees to
float32 rounding, see tests/test_privacy.py).

What needs no clipping: a method's regulariser (subspace_reg's) is a function of the global state and
the client's current parameters, not of any example; its gradient is added after the noise, which makes
it post-processing of the private gradient, so it costs no privacy and the accountant ignores it.
fedgalore's projected optimiser reads only the released (clipped, noised) weight gradient: its
projector (top singular vectors of the first released gradient), moments and the second moment it
uploads are post-processing too; the noise is drawn in the full m x n weight space.

The noise is drawn from a generator seeded by (seed, round, client), so runs reproduce and resume bit for
bit. That makes the noise predictable to whoever knows the run seed: a deployment must keep the seed
secret from the server and everyone else (or draw from a secure source, as Opacus' ``secure_mode`` does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class ExampleLevelDP:
    """DP-SGD's parameters for a run: the clip norm of one example's gradient and each client's noise
    multiplier (the same for all unless calibrated per client: config ``dp_noise_per_client``)."""

    max_grad_norm: float
    noise_multipliers: tuple[float, ...]  # by client id

    @property
    def largest_noise_multiplier(self) -> float:
        return max(self.noise_multipliers)


def window_count(max_local_steps: int, window: int) -> int:
    """Optimiser steps (noised releases) of one client round: one per accumulation window."""
    return math.ceil(max_local_steps / window)


class PrivateGradients:
    """Per-question clipping and noise for one client round over ``parameters`` (everything that trains).

    Attaches Opacus' hooks to ``model`` when made; :meth:`detach` removes them at the round's end (a
    round that raises leaves them on a model whose run is failing anyway). ``noise_seed`` seeds the noise.
    """

    def __init__(
        self,
        settings: ExampleLevelDP,
        client_id: int,
        model: nn.Module,
        parameters: Sequence[nn.Parameter],
        batch_size: int,
        rows_per_example: int,
        noise_seed: int,
    ) -> None:
        self.batch_size, self.rows_per_example = batch_size, rows_per_example
        self.parameters = list(parameters)
        self.hooks = GradSampleHooks(model, loss_reduction="sum")
        # Opacus' DPOptimizer clips and noises the gradients of the parameters its optimiser holds; this
        # carrier only holds them (it never steps: the method's own optimisers do).
        self.dp = DPOptimizer(
            torch.optim.SGD(self.parameters, lr=0.0),
            noise_multiplier=settings.noise_multipliers[client_id],
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(noise_seed),
        )

    def backward(self, loss: Tensor) -> None:
        """Per-question gradients of ``loss``, the mean cross-entropy over this micro-batch's questions."""
        with warnings.catch_warnings():  # the hooks fire on module outputs; no input needs a gradient
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            (loss * self.batch_size).backward()  # the sum over questions: each row holds its own gradient
        for param in self.parameters:
            p: Any = param  # Opacus' hooks add grad_sample (and summed_grad) to parameters at run time
            latest = p.grad_sample[-1] if isinstance(p.grad_sample, list) else p.grad_sample
            questions = latest.reshape(self.batch_size, self.rows_per_example, *latest.shape[1:]).sum(1)
            if isinstance(p.grad_sample, list):
                p.grad_sample[-1] = questions
            else:
                p.grad_sample = questions

    def release(self) -> None:
        """Each question's gradient since the last release clipped, summed, noised and divided by the
        number of questions: the parameters' ``grad``. The per-question gradients are consumed."""
        self.dp.pre_step()
        for param in self.parameters:
            p: Any = param
            p.grad_sample = None
            p.summed_grad = None

    def detach(self) -> None:
        self.hooks.cleanup()  # the hooks, and the per-sample attributes Opacus put on the parameters
