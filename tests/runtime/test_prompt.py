"""Prompts: the chat template around the text, and truncation that keeps the template whole."""

import pytest

from runtime.prompt import Prompter, PromptError
from tests.tiny_tokenizer import tiny_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_raw_text_is_the_tokenizers_encoding():
    tokenizer = tiny_tokenizer()
    assert Prompter(tokenizer, chat_template=False).encode(TEXT) == tokenizer.encode(TEXT)
    assert Prompter(tokenizer, chat_template=False).encode(TEXT, truncate=10) == tokenizer.encode(TEXT)[-10:]


def test_the_chat_template_is_the_tokenizers_rendering():
    tokenizer = tiny_tokenizer()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False,
                                             add_generation_prompt=True)
    assert Prompter(tokenizer, chat_template=True).encode(TEXT) == tokenizer.encode(rendered,
                                                                                     add_special_tokens=False)


def test_truncate_keeps_the_chat_template_whole():
    tokenizer = tiny_tokenizer()
    prompter = Prompter(tokenizer, chat_template=True)
    text = TEXT
    full = prompter.encode(text)
    head = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert full[:len(head)] == head and full[-len(tail):] == tail
    for truncate in (len(full) - 1, 40, len(head) + len(tail) + 1):
        cut = prompter.encode(text, truncate=truncate)
        assert len(cut) <= truncate
        assert cut[:len(head)] == head and cut[-len(tail):] == tail  # the template survives
        kept = tokenizer.decode(cut[len(head):-len(tail)])
        assert kept and text.endswith(kept)  # the user's text lost its front only
    assert prompter.encode(text, truncate=len(full)) == full
    with pytest.raises(PromptError, match="template"):
        prompter.encode(text, truncate=len(head) + len(tail))


def test_a_huge_text_is_truncated_from_its_tail_only():
    prompter = Prompter(tiny_tokenizer(), chat_template=True)
    tail = "The quick brown fox jumps over the lazy dog."
    huge = prompter.encode("x" * 10_000_000 + tail, truncate=30)  # tokenizes (30 + 16) * max_token_chars
    assert huge == prompter.encode("x" * 1000 + tail, truncate=30)
