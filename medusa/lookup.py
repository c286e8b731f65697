"""Prompt lookup: guess the next tokens by finding the text's last few tokens earlier in the text.

Answers often copy from their prompt or from themselves: names and numbers in an extraction, a
passage being summarised, identifiers in code. Prompt lookup decoding (Saxena 2023) drafts those
copies for free: find the most recent earlier occurrence of the sequence's last n tokens
(an n-gram, the longest n that matches first) and propose the tokens that followed it.

Medusa heads see only the last hidden state, so they cannot copy a rare name from far back; a
lookup branch in the candidate tree (`build_tree(..., lookup=L)`) can. Its drafts are a
deterministic function of the tokens, so every acceptance rule keeps its guarantees.

A request may also bring a predicted output (OpenAI's Predicted Outputs: a file to rewrite with a few
changes); its n-grams are looked up first, from where the text last followed it.
"""

from __future__ import annotations

# the longest suffix matched. 6 accepted as much as 3 (40 Spec-Bench dev prompts, float32, the draft
# layer, dynamic:32,topk=16,depth=8,lookup=32: 3.115 against 3.113 tokens per step)
MAX_N = 3


class NgramIndex:
    """A sequence's tokens, and where each of its n-grams (n = 1..max_n) last ended.

    The index grows lazily in `propose`: only n-grams ending before the last token are in it,
    since the suffix that ends at the last token must match an *earlier* occurrence, one that has
    a continuation.
    """

    def __init__(self, tokens: list[int], max_n: int = MAX_N, prediction: list[int] = ()) -> None:
        assert max_n >= 1
        self.max_n = max_n
        self.tokens = list(tokens)
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token
        self._indexed = 0  # n-grams ending before this index are in `_last_end`
        # a predicted output (OpenAI's `prediction`): each n-gram's ends in it, and where the text
        # last matched it (the next match is looked for from there on, as the text follows it)
        self.prediction = list(prediction)
        self._prediction_ends: dict[tuple[int, ...], list[int]] = {}
        for end in range(len(self.prediction) - 1):
            for n in range(1, min(max_n, end + 1) + 1):
                self._prediction_ends.setdefault(tuple(self.prediction[end - n + 1:end + 1]), []).append(end)
        self._followed = 0

    def extend(self, tokens: list[int]) -> None:
        self.tokens += tokens

    def propose(self, length: int, after: list[int] = ()) -> list[int]:
        """Up to `length` tokens that followed the latest earlier occurrence of the longest
        matching suffix (n = max_n down to 1); [] when nothing matches. after: tokens taken to follow
        the text (a grammar's chain so far, not yet emitted), with which the suffix ends."""
        tokens, last = self.tokens, len(self.tokens) - 1
        for end in range(self._indexed, last):  # index the n-grams that now have a continuation
            for n in range(1, min(self.max_n, end + 1) + 1):
                self._last_end[tuple(tokens[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, last)
        text = tokens[max(0, last + 1 - self.max_n):] + list(after)  # the end of the text, then `after`
        for n in range(min(self.max_n, len(text)), 0, -1):
            suffix = tuple(text[len(text) - n:])
            if ends := self._prediction_ends.get(suffix):  # the prediction first, where the text follows it
                end = next((e for e in ends if e >= self._followed), ends[-1])
                if not after:  # (a guess after guesses does not move where the text follows it)
                    self._followed = end + 1
                return self.prediction[end + 1:end + 1 + length]
            end = self._last_end.get(suffix) if n <= last else None
            if end is not None:
                return tokens[end + 1:end + 1 + length]
        return []
