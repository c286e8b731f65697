"""Incremental detokenization: the text each new token adds, never half a UTF-8 character.

Decoding one token alone is wrong in two ways: a byte-level token may hold only part of a
character's bytes (it decodes to U+FFFD), and SentencePiece tokenizers drop a word's leading
space when the word starts the decoded text. So each new token is decoded together with a few
tokens before it (`prefix_offset`), and the text it adds is the difference with the same prefix
decoded without it. While the tail is an incomplete character the token adds "" and its text
arrives with the token that completes the character.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the context window decoded with each new token
        self.read_offset = 0  # tokens before this index have had their text returned

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.token_ids[self.prefix_offset:])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text `push` still holds back, an incomplete last character as U+FFFD (what decoding the
        whole text gives), for the end of a stream."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return text[len(prefix_text):]

    def _decode(self, token_ids: list[int]) -> str:
        # special tokens keep their text here, as in TGI's token events
        return self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
