"""`vgtrain shards`: turn image-text sources into WebDataset shards (the command is :mod:`vgtrain.cli.shards`).

Kept free of torch and webdataset imports at package level: the image workers import
:mod:`vgtrain.data.ingest.images` and should start fast.
"""
