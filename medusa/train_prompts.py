"""The project's own training instructions for self-distillation: templates x topics, seeded.

Written for this project (not taken from any benchmark: Spec-Bench prompts are the evaluation).
Categories: writing, reasoning, math, coding, extraction, translation, summarisation, question
answering and roleplay.
"""

from __future__ import annotations

import itertools
import random

TOPICS = [
    "the ocean", "volcanoes", "honeybees", "the Roman Empire", "electric cars", "coffee", "chess",
    "the moon landing", "rainforests", "public libraries", "solar power", "the printing press",
    "video games", "sleep", "friendship", "city parks", "the internet", "dinosaurs", "bread baking",
    "mountain climbing", "jazz music", "recycling", "the human heart", "trains", "photography",
    "vaccines", "the Silk Road", "robots", "gardening", "deserts", "the weather", "penguins",
    "smartphones", "ancient Egypt", "football", "climate change", "bicycles", "learning a language",
    "black holes", "tea", "the stock market", "volunteering", "painting", "earthquakes", "birds",
    "space telescopes", "cooking pasta", "remote work", "museums", "the immune system",
]

TEMPLATES = {
    "writing": [
        "Write a short essay about {t}.", "Write a poem about {t}.", "Write a blog post introducing {t}.",
        "Write a short story that involves {t}.", "Write a persuasive paragraph about why {t} matters.",
        "Draft an email to a friend telling them about {t}.", "Write a product description related to {t}.",
    ],
    "reasoning": [
        "What are the pros and cons of {t}? Think step by step.",
        "Compare {t} with {u}. Which is more important, and why?",
        "Explain the causes and effects of {t}.", "What would happen if {t} disappeared tomorrow?",
        "Give three arguments for and three against focusing on {t}.",
    ],
    "qa": [
        "What is {t}?", "Explain {t} to a ten-year-old.", "Give me five interesting facts about {t}.",
        "How does {t} work?", "What is the history of {t}?", "Why do people care about {t}?",
    ],
    "summarisation": [
        "Summarise in three sentences what you know about {t}.",
        "Give a one-paragraph summary of the main ideas behind {t}.",
        "List the key points someone should know about {t}.",
    ],
    "extraction": [
        "List the most important terms related to {t} and define each one.",
        "From what you know about {t}, extract the main people, places and dates as a list.",
        "Make a table of facts about {t} with two columns: fact and explanation.",
    ],
    "translation": [
        "Translate into French: 'I would like to learn more about {t}.'",
        "Translate into Spanish: 'My favourite subject is {t}.'",
        "Translate into German: 'We talked about {t} all evening.'",
        "How do you say '{t}' in Italian, and how is it pronounced?",
    ],
    "roleplay": [
        "Pretend you are a tour guide and describe {t} to visitors.",
        "You are a teacher. Give a short lesson about {t}.",
        "Act as a journalist interviewing an expert on {t}. Write the interview.",
        "Imagine you are a scientist studying {t}. Describe your typical day.",
    ],
}

CODING = [
    "Write a Python function that {task}.", "Write a JavaScript function that {task}.",
    "Explain how to write a program that {task}.", "Write a C function that {task}.",
]
CODING_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "sorts a list of numbers", "counts the vowels in a sentence", "finds the largest element in a list",
    "returns the Fibonacci numbers up to n", "checks whether a word is a palindrome",
    "merges two sorted lists", "removes duplicates from a list", "converts Celsius to Fahrenheit",
    "counts how often each word appears in a text", "computes the average of a list",
    "finds the greatest common divisor of two numbers", "flattens a nested list",
]
MATH = [
    "What is {a} plus {b}?", "What is {a} times {b}?", "If a shop sells {a} apples a day, how many does it "
    "sell in {b} days?", "Solve for x: {a}x + {b} = {c}.", "What is {a}% of {c}?",
    "A train travels {a} km in {b} hours. What is its average speed?",
    "Tom has {a} marbles and gives {b} to his sister. How many are left?",
]


STYLES = ["", " Keep it brief.", " Use simple words.", " Answer in detail.", " Use a numbered list."]


def training_prompts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` distinct (category, instruction) pairs, in a seeded random order."""
    rng = random.Random(seed)
    pool: list[tuple[str, str]] = []
    for category, templates in TEMPLATES.items():
        for template, topic, style in itertools.product(templates, TOPICS, STYLES):
            other = rng.choice([x for x in TOPICS if x != topic])
            pool.append((category, template.format(t=topic, u=other) + style))
    for template, task in itertools.product(CODING, CODING_TASKS):
        pool.append(("coding", template.format(task=task)))
    seen = {p for _, p in pool}
    num_math = max(count // 10, count - len(pool))
    while num_math:
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        prompt = rng.choice(MATH).format(a=a, b=b, c=rng.randint(a + 1, 500))
        if prompt not in seen:
            seen.add(prompt)
            pool.append(("math", prompt))
            num_math -= 1
    rng.shuffle(pool)
    return pool[:count]
