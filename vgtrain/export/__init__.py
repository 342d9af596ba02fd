"""The export: a small, self-describing folder of adapter tensors and the facts to rebuild the model.

:mod:`~vgtrain.export.artifact` defines the format (shared by the writer and the decoder that reads
it); :mod:`~vgtrain.export.writer` turns a training checkpoint into one. Pure torch + safetensors:
no lightning, hydra, wandb or webdataset in this package.
"""
