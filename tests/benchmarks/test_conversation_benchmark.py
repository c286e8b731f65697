"""`python -m benchmarks.conversation`: the later turns of a conversation start from the prefix cache,
with the output an engine without it gives (a tiny model over the tiny tokenizer)."""

import json

from benchmarks import conversation
from benchmarks.spec_bench import read_conversations
from tests.server.support import tiny_loaded


def test_later_turns_are_timed_and_served_from_the_cache(tmp_path, capsys):
    path = tmp_path / "questions.jsonl"
    rows = [{"question_id": 0, "category": "writing", "turns": ["Tell a story.", "Shorter.", "Again."]},
            {"question_id": 1, "category": "math", "turns": ["What is 2 + 2?"]},
            {"question_id": 2, "category": "stem", "turns": ["Why is the sky blue?", "And at night?"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    conversations = read_conversations(path)
    assert conversations == [rows[0]["turns"], rows[2]["turns"]]
    summary = conversation.measure(tiny_loaded(), None, None, conversations, max_new=8)
    assert summary["conversations"] == 2 and summary["same_output"] == 1.0
    assert 0 < summary["cached_share"] < 1  # a later turn holds the earlier ones (their answers where exact)
    assert summary["ttft_ms"]["cached"] > 0 and summary["ttft_ms"]["uncached"] > 0
    assert "same output True" in capsys.readouterr().out
