import torch

from vgtrain.data.collate import IGNORE_INDEX, CaptionCollator
from vgtrain.models.backbones.tiny import build_tiny_tokenizer


def test_labels_mask_exactly_prefix_prompt_and_padding():
    tokenizer = build_tiny_tokenizer()
    collate = CaptionCollator(tokenizer, prefix_length=3, prompt="a picture of")
    prompt_len = len(tokenizer("a picture of", add_special_tokens=False).input_ids)
    captions = ["a red circle", "a small blue square at the top left"]
    batch = collate([{"caption": c, "key": str(i)} for i, c in enumerate(captions)])

    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) + 1 for c in captions]  # + EOS
    text_len = batch["input_ids"].shape[1]
    assert text_len == prompt_len + max(lengths)
    assert batch["labels"].shape == (2, 3 + text_len)
    for row, (caption, n) in enumerate(zip(captions, lengths, strict=True)):
        labels = batch["labels"][row]
        start = 3 + prompt_len
        assert (labels[:start] == IGNORE_INDEX).all()  # prefix and prompt
        expected = tokenizer(caption, add_special_tokens=False).input_ids + [eos]
        assert labels[start : start + n].tolist() == expected
        assert (labels[start + n :] == IGNORE_INDEX).all()  # padding
        assert batch["attention_mask"][row].sum() == prompt_len + n
        # The text the LLM reads holds the same caption tokens right after the prompt.
        assert batch["input_ids"][row, prompt_len : prompt_len + n].tolist() == expected


def test_caption_truncation_keeps_eos():
    tokenizer = build_tiny_tokenizer()
    collate = CaptionCollator(tokenizer, prefix_length=2, max_caption_tokens=3)
    batch = collate([{"caption": "a small blue square at the top left", "key": "k"}])
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE_INDEX]
    assert kept.numel() == 4 and kept[-1] == tokenizer.eos_token_id
    assert torch.equal(batch["input_ids"][0], kept)
