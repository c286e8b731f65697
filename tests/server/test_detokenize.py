"""Incremental detokenization never splits a UTF-8 character and adds up to the whole text."""

import pytest

from server.detokenize import REPLACEMENT_CHAR, IncrementalDecoder
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.mark.parametrize("text", ["caf\u00e9 \u2603 ok", "\u2603\u2603", "x\U0001f600y", "The quick fox."])
def test_pieces_are_whole_characters_and_add_up(text):
    tokenizer = tiny_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_a_character_split_over_three_tokens_arrives_with_the_third():
    tokenizer = tiny_tokenizer()
    snowman = tokenizer.encode("\u2603")
    assert len(snowman) == 3  # one byte per token in this tiny vocabulary
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(t) for t in snowman] == ["", "", "\u2603"]


def test_special_tokens_keep_their_text():
    tokenizer = tiny_tokenizer()
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id]
    assert "".join(decoder.push(t) for t in ids) == "Hello<|im_end|>"


def test_flush_gives_what_push_holds_back_as_the_whole_text_decodes_it():
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode("ok \u2603")[:-1]  # the snowman's last byte cut off
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids]
    assert pieces[-2:] == ["", ""]
    rest = decoder.flush()
    assert rest.startswith(REPLACEMENT_CHAR)
    assert "".join(pieces) + rest == tokenizer.decode(ids)
    assert decoder.flush() == ""  # given once
