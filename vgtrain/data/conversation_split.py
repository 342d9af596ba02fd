"""Reading a split's conversations for evaluation: ``(key, image, conversations)`` per sample,
in shard order (``vgtrain eval task=vqa``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import webdataset as wds
from PIL import Image

from vgtrain.data.conversation import Conversation, ConversationError, read_conversations
from vgtrain.data.pipeline import decode_sample_image, expand_urls


def read_conversation_split(
    urls: str, limit: int | None, counter: Any
) -> Iterator[tuple[str, Image.Image, list[Conversation]]]:
    """``(key, image, conversations)`` of the shards, in order, each once (at most ``limit``
    images); samples without an image or a conversation, or with a bad one, are counted."""
    stages = [wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples(handler=counter.tar_error)]
    count = 0
    for sample in wds.DataPipeline(*stages):
        where = f"{sample.get('__key__')} in {sample.get('__url__')}"
        try:
            conversations = read_conversations(sample.get("json"))
        except ConversationError as error:
            counter.skip("bad_conversation", f"{where}: {error}")
            continue
        if not conversations:
            counter.skip("no_conversation", where)
            continue
        image = decode_sample_image(sample, counter)
        if image is None:
            continue
        yield str(sample["__key__"]), image, conversations
        count += 1
        if limit is not None and count >= limit:
            return
