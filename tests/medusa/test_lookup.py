"""Prompt lookup: the guesses are what followed the latest earlier occurrence of the longest
matching suffix, however the token list grew."""

import random

from medusa.lookup import NgramIndex


def reference_proposal(tokens: list[int], length: int, max_n: int) -> list[int]:
    """Search from scratch: longest n first, then the latest earlier occurrence."""
    last = len(tokens) - 1
    for n in range(min(max_n, last), 0, -1):
        suffix = tokens[last - n + 1:]
        for end in range(last - 1, n - 2, -1):
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + length]
    return []


def test_hand_checked_proposals() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3], max_n=3)
    assert index.propose(3) == [4, 5, 9]  # "2 3" was followed by "4 5 9"
    index.extend([7])
    assert index.propose(3) == []  # 7 never occurred before
    index.extend([2])
    # "3 7 2" and "7 2" did not occur before; the latest earlier "2" (index 6) was followed by "3 7"
    assert index.propose(2) == [3, 7]
    assert index.propose(5) == [3, 7, 2]  # a match near the end gives a shorter guess


def test_longest_match_wins_over_the_latest() -> None:
    # "1 2" occurs twice; the 2-gram at the end matches the first one, the 1-gram "2" the later one
    index = NgramIndex([1, 2, 8, 5, 2, 9, 1, 2], max_n=2)
    assert index.propose(2) == [8, 5]


def test_incremental_index_equals_a_search_from_scratch() -> None:
    rng = random.Random(0)
    for trial in range(30):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
        index = NgramIndex(tokens, max_n=3)
        for _ in range(40):
            assert index.propose(4) == reference_proposal(tokens, 4, 3), (trial, tokens)
            more = [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
            tokens += more
            index.extend(more)


def test_a_prediction_is_drafted_from_where_the_text_follows_it() -> None:
    prediction = [10, 11, 12, 13, 10, 11, 14, 15]  # "10 11" twice: followed by 12, then by 14
    index = NgramIndex([1, 2, 3], max_n=2, prediction=prediction)
    assert index.propose(3) == []  # nothing of the prompt's end is in it
    index.extend([10, 11])
    assert index.propose(3) == [12, 13, 10]  # the first "10 11", from the start
    index.extend([12, 13, 10, 11])
    assert index.propose(3) == [14, 15]  # the second: the text has followed the prediction past the first
    index.extend([14, 15, 2, 3])
    assert index.propose(2) == [10, 11]  # past the prediction's end: the text's own earlier "2 3"
    index.extend([1])
    assert index.propose(2) == [2, 3]  # and its earlier "1"
    assert NgramIndex([5, 10], max_n=2, prediction=prediction).propose(2) == [11, 12]  # a 1-gram, ahead


def test_a_guess_after_guesses_continues_the_text_they_would_extend() -> None:
    """propose(after=...): the suffix matched ends with the tokens taken to follow the text (a grammar's
    lookup chain so far), the guess is still the text's own; the index is left as it was."""
    rng = random.Random(1)
    for trial in range(30):
        tokens = [rng.randrange(5) for _ in range(rng.randrange(2, 12))]
        index = NgramIndex(tokens, max_n=3)
        for _ in range(10):
            after = [rng.randrange(5) for _ in range(rng.randrange(0, 4))]
            text, last = tokens + after, len(tokens) - 1
            expected = next((tokens[end + 1:end + 4] for n in range(min(3, len(text), last), 0, -1)
                             for end in range(last - 1, n - 2, -1)
                             if tokens[end - n + 1:end + 1] == text[-n:]), [])
            assert index.propose(3, after=after) == expected, (trial, tokens, after)
            assert index.propose(3) == reference_proposal(tokens, 3, 3)
            more = [rng.randrange(5)]
            tokens += more
            index.extend(more)
    prediction = [10, 11, 12, 13, 10, 11, 14, 15]
    index = NgramIndex([1, 10], max_n=2, prediction=prediction)
    assert index.propose(2, after=[11]) == [12, 13]
    assert index.propose(2, after=[11, 12, 13, 10, 11]) == [12, 13]  # the first "10 11" still: not moved on
    assert index.propose(2) == [11, 12]  # and the text itself still follows it from the start
