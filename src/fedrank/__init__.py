"""fedrank: federated LoRA fine-tuning with rank-heterogeneous clients."""

__version__ = "0.1.0"
