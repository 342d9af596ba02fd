"""Reading a split's conversations for evaluation: ``(key, image, conversations)`` per sample,
in shard order (``vgtrain eval task=vqa``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from PIL import Image

from vgtrain.data.conversation import Conversation, ConversationError, read_conversations
from vgtrain.data.pipeline import IMAGE_EXTENSIONS, expand_urls


def read_conversation_split(
    urls: str, limit: int | None, counter: Any
) -> Iterator[tuple[str, Image.Image, list[Conversation]]]:
    """``(key, image, conversations)`` of the shards, in order, each once (at most ``limit``
    images); samples without an image or a conversation, or with a bad one, are counted."""
    stages = [wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples(handler=counter.tar_error)]
    count = 0
    for sample in wds.DataPipeline(*stages):
        where = f"{sample.get('__key__')} in {sample.get('__url__')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            conversations = read_conversations(sample.get("json"))
        except ConversationError as error:
            counter.skip("bad_conversation", f"{where}: {error}")
            continue
        if ext is None or not conversations:
            counter.skip("missing_image" if ext is None else "no_conversation", where)
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as handle:
                image = handle.convert("RGB")
        except Exception as error:  # PIL raises many types for corrupt data
            counter.skip("bad_image", f"{where}: {error}")
            continue
        yield str(sample["__key__"]), image, conversations
        count += 1
        if limit is not None and count >= limit:
            return
