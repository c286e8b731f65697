"""Text -> prompt token ids: the model's chat template around the text as one user message, or the
raw text, and truncation that keeps the template whole.

`truncate` drops tokens of the user's text from its front until the whole prompt (template
included) fits, so the template's system and user headers survive; TGI's left truncation of the
rendered prompt would cut them off. It works for any template: the kept tail of the text is decoded
and the template rendered around it again.
"""

from __future__ import annotations

from functools import cached_property

# Slack, in tokens, kept before the part of a long text that truncation keeps: the first tokens
# after a cut may merge differently than in the whole text.
CUT_SLACK_TOKENS = 16


class PromptError(ValueError):
    """A prompt that cannot be built as asked (e.g. `truncate` smaller than the template)."""


class Prompter:
    def __init__(self, tokenizer, chat_template: bool) -> None:
        """chat_template: wrap texts in the tokenizer's chat template (ignored when it has none)."""
        self.tokenizer = tokenizer
        self.chat_template = bool(chat_template and tokenizer.chat_template)

    @cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more characters of the text, so
        a text of c characters has at least c / max_token_chars tokens (byte-level entries spell one
        character per byte, at least as many as the text characters they decode to)."""
        return max(len(token) for token in self.tokenizer.get_vocab())

    def encode(self, text: str, truncate: int | None = None) -> list[int]:
        """The prompt's token ids; with `truncate`, at most that many (PromptError if the template alone
        does not fit). A long text is cut to the characters that can hold the kept tokens before it is
        tokenized, so truncating a megabyte costs what truncating a page does."""
        if truncate is None:
            return self._encode(text)
        text = text[-(truncate + CUT_SLACK_TOKENS) * self.max_token_chars:]
        ids = self._encode(text)
        if len(ids) <= truncate:
            return ids
        body = self.tokenizer.encode(text, add_special_tokens=False)
        keep = len(body) - (len(ids) - truncate)  # drop the excess from the front of the text
        while keep > 0:
            # a cut inside a multi-byte character decodes to U+FFFD: drop it
            ids = self._encode(self.tokenizer.decode(body[-keep:]).lstrip("\ufffd"))
            if len(ids) <= truncate:
                return ids
            keep -= len(ids) - truncate
        raise PromptError(f"`truncate` ({truncate}) leaves no room for the text: the prompt's template "
                          f"alone takes {len(self._encode(''))} tokens")

    def _encode(self, text: str) -> list[int]:
        if not self.chat_template:
            return self.tokenizer.encode(text)
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.tokenizer.encode(rendered, add_special_tokens=False)
