"""fedsubspace: federated LoRA fine-tuning with geometry-aware server aggregation."""

__version__ = "0.1.0"
