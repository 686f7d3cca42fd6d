"""What each method's rule lets the three privacy mechanisms do, declared once per method as data.

Every method file declares a :class:`PrivacySupport` (``Method.privacy``); the runners refuse a privacy
option the method's declaration says no to, and the README's compatibility table is rendered from the
same declarations (:func:`fedsubspace.privacy.table.compatibility_table`). The mechanisms:

- **DP-SGD** (example-level, on each client): every local optimiser step clips each example's gradient
  of everything that trains and adds Gaussian noise to their sum. It needs a client that trains by
  gradient steps on per-example losses.
- **Client-level DP** (DP-FedAvg): each client's upload, taken as its change from what it started the
  round from, is clipped to a norm; the server adds Gaussian noise to the sum of the clipped changes and
  divides by the (fixed, public) number of clients a round. It needs a server rule that is a function of
  the sum of the uploads alone: the noise can then go on that sum, and the rule is post-processing.
- **SecAgg+** (Flower): the server learns only the sum of the uploads, never one of them. It needs the
  same thing: a rule that reads nothing but the weighted sum of uploads of one shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Support:
    """Whether a method can run under one mechanism, and the reason (a sentence for the table)."""

    ok: bool
    why: str


@dataclass(frozen=True)
class PrivacySupport:
    dp_sgd: Support
    client_dp: Support
    secagg: Support


# The reasons several methods share, worded once.
LORA_STEPS = Support(True, "clients train their LoRA factors (and head) by AdamW steps on example losses")


def summed_upload(what: str) -> PrivacySupport:
    """A method whose server rule reads only the weighted sum of ``what`` the clients upload."""
    return PrivacySupport(
        dp_sgd=LORA_STEPS,
        client_dp=Support(
            True, f"the rule is a function of the sum of the uploaded {what}: clip each change, noise the sum"
        ),
        secagg=Support(True, f"the rule needs only the weighted sum of the uploaded {what}"),
    )


def individual_uploads(reason: str, dp_sgd: Support = LORA_STEPS) -> PrivacySupport:
    """A method whose server rule needs each client's upload on its own (``reason`` says for what)."""
    return PrivacySupport(
        dp_sgd=dp_sgd,
        client_dp=Support(False, f"the rule {reason}, not a sum of uploads the server could noise"),
        secagg=Support(False, f"the rule {reason}, which a sum of uploads does not give"),
    )
