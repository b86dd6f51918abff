"""fedpipe: plan and run federated LoRA fine-tuning across heterogeneous edge servers."""

__version__ = "0.1.0"
