"""The training layer: the LightningModule and DataModule, callbacks, checkpointing and recovery,
strategies, sweeps. Lightning (and wandb) live here and above, never below."""
