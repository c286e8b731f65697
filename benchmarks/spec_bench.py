"""Spec-Bench prompts: a jsonl file, one {"question_id", "category", "turns"} per line. The benchmarks
ask the first turn of each question (`read_questions`), but `benchmarks.conversation`, which asks every
turn of the questions that have several, each after the model's answer to the one before."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    category: str
    text: str  # the first turn


def read_questions(path: Path, limit: int | None = None) -> list[Question]:
    """The file's questions in order, the first `limit` of them when given."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Question(row["category"], row["turns"][0]) for row in rows[:limit]]


def read_conversations(path: Path, limit: int | None = None) -> list[list[str]]:
    """The turns of the file's questions that have more than one, in order, the first `limit` of them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["turns"] for row in rows if len(row["turns"]) > 1][:limit]
