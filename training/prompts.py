"""The project's own training instructions for self-distillation: templates x topics, seeded.

Written for this project (not taken from any benchmark: Spec-Bench prompts are the evaluation).
Two sets. `training_prompts`: templates x topics in writing, reasoning, math, coding, extraction,
translation, summarisation, question answering and roleplay. `varied_prompts`: longer instructions
with constraints, personas, puzzles, multi-step problems, many programming tasks and languages, STEM
and humanities questions, and tasks over passages (the base model's own earlier answers).
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


# ---------------------------------------------------------------- the varied set

# A second, broader set (`distill --prompt-set varied`): longer instructions with constraints,
# personas, puzzles, multi-step word problems, many programming tasks and languages, STEM and
# humanities questions, and tasks over a passage (extract, summarise, answer from, translate,
# rewrite). Passages are the base model's own earlier answers (`distill --passages FOLDER`).

SUBJECTS = TOPICS + [
    "quantum computing", "the French Revolution", "microplastics", "sourdough starters", "wind turbines",
    "the Renaissance", "antibiotic resistance", "urban gardening", "cryptography", "coral reefs",
    "the Industrial Revolution", "meditation", "self-driving cars", "the water cycle", "social media",
    "renewable energy policy", "the Cold War", "marathon training", "3D printing", "bees and pollination",
    "the history of jazz", "minimalism", "electric guitars", "tidal energy", "the Great Wall of China",
    "online privacy", "time management", "plate tectonics", "the Olympic Games", "artificial intelligence",
    "street food", "the Amazon river", "nuclear fusion", "board games", "ancient Greek theatre",
    "small businesses", "public transport", "the periodic table", "migration of whales", "typography",
]
PERSONAS = [
    "a pirate captain", "a medieval knight", "a detective in 1920s London", "a famous chef",
    "a startup founder pitching to investors", "a family doctor", "a wise old wizard",
    "a sports commentator", "a friendly customer service agent", "a travel agent", "a stand-up comedian",
    "an astronaut on a space station", "a high school chemistry teacher", "a museum curator",
    "a fitness coach", "a grumpy cat", "a Victorian-era novelist", "a financial advisor",
    "a park ranger", "a robot learning about humans",
]
PROBLEMS = [
    "I keep procrastinating on my homework", "my neighbour plays loud music at night",
    "I want to start running but get tired quickly", "my team at work misses deadlines",
    "I am nervous about a job interview", "my plants keep dying", "I spend too much money on takeaway food",
    "I cannot decide which programming language to learn first", "my two friends are arguing",
    "I want to save for a holiday",
]
FORMATS = ["a bulleted list", "a JSON object", "a numbered list", "a two-column table", "a CSV table",
           "one short sentence per item"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Chinese", "Japanese", "Dutch"]
PROGRAMMING = ["Python", "JavaScript", "C++", "Java", "Go", "Rust", "TypeScript", "C"]
PROGRAM_TASKS = CODING_TASKS + [
    "parses a CSV file and prints the sum of one column", "implements binary search on a sorted array",
    "finds the longest common prefix of a list of strings",
    "checks whether brackets in a string are balanced",
    "implements a stack with push, pop and peek", "rotates a matrix by 90 degrees",
    "returns the k most frequent words in a text", "validates an email address",
    "computes the edit distance between two strings", "finds the median of two sorted arrays",
    "implements a simple LRU cache", "detects a cycle in a linked list", "transposes a matrix",
    "converts a Roman numeral to an integer", "finds all pairs in a list that sum to a target",
    "reads a text file and counts its lines", "implements bubble sort",
    "generates all permutations of a string",
    "computes the power set of a set", "finds the shortest path in an unweighted graph",
    "checks whether two strings are anagrams", "implements a queue using two stacks",
    "finds the maximum subarray sum", "serialises a binary tree to a string",
]
PROGRAM_TEMPLATES = [
    "Write a {lang} function that {task}.",
    "Implement a program in {lang} that {task}. Explain your approach.",
    "Write a {lang} function that {task}, and state its time and space complexity.",
    "How would you write code that {task}? Use {lang} and add comments.",
    "Write a function that {task}, then write two unit tests for it.",
]
CONCEPTS = [
    ("recursion", "iteration"), ("a list", "a tuple"), ("a process", "a thread"), ("SQL", "NoSQL databases"),
    ("a compiler", "an interpreter"), ("TCP", "UDP"), ("a class", "an object"), ("git merge", "git rebase"),
    ("a stack", "a queue"), ("static typing", "dynamic typing"), ("HTTP GET", "HTTP POST"),
    ("unit tests", "integration tests"),
]
TABLES = [("employees", "name, department, salary, hire_date"),
          ("orders", "id, customer_id, total, created_at"), ("students", "id, name, grade, class"),
          ("products", "id, name, price, stock"),
          ("books", "title, author, year, genre")]
QUERIES = ["the five highest values of the third column",
           "the average of the third column per group of the fourth column",
           "all rows where the third column is above the average",
           "the number of rows per value of the fourth column", "duplicate values of the second column"]
STEM = [
    "photosynthesis", "entropy", "Newton's second law", "DNA replication", "natural selection",
    "the greenhouse effect", "electric circuits", "the Doppler effect", "supply and demand",
    "overfitting in machine learning", "the Pythagorean theorem", "chemical equilibrium",
    "the theory of relativity", "how vaccines train the immune system", "binary numbers", "osmosis",
    "the speed of light", "compound interest", "half-life in radioactive decay", "neural networks",
    "the carbon cycle", "Ohm's law", "probability distributions", "the structure of an atom",
    "how batteries store energy", "buoyancy", "the big bang", "prime numbers", "genetic mutations",
    "how a refrigerator works",
]
STEM_TEMPLATES = [
    "Explain {s} and give an everyday example.",
    "What is {s}? Explain it as if I were a high school student.",
    "Describe {s} in simple terms, then give the key equation or rule if there is one.",
    "What are common misconceptions about {s}?", "How is {s} used in modern technology or daily life?",
]
HUMANITIES = [
    "the invention of the printing press", "the fall of the Roman Empire", "the Industrial Revolution",
    "the abolition of slavery", "the spread of democracy", "the rise of social media", "globalisation",
    "the Renaissance", "the space race", "the invention of writing", "colonialism", "the Enlightenment",
    "the women's suffrage movement", "the internet", "urbanisation",
]
HUMANITIES_TEMPLATES = [
    "Discuss the impact of {h} on society.", "What were the main causes and consequences of {h}?",
    "How did {h} change the way people live and work? Give examples.",
    "Write a short essay on {h} and what we can learn from it today.",
    "Compare {h} with {g}: what do they have in common?",
]
WRITING = [
    "Write a travel blog post about a trip to a city famous for {t}, with three must-see places.",
    "Write a persuasive email to your manager proposing a new project about {t}. Keep it under 200 words.",
    "Write a letter to a local newspaper arguing for more attention to {t}.",
    "Write a limerick about {t}.", "Write a haiku about {t}.",
    "Write a speech for a school assembly about {t}.",
    "Describe a vivid scene that involves {t}, using sensory details.",
    "Write a short dialogue between two friends who disagree about {t}.",
    "Write an outline for a blog post about {t}, with headings and key points.",
    "Write the opening paragraph of a mystery novel in which {t} plays a role.",
    "Write a product review of an imaginary gadget related to {t}.",
    "Write a motivational message for someone who is new to {t}.",
    "Write a catchy slogan and a short advertisement about {t}.",
    "Write a short story for children about {t}, in fewer than 150 words.",
]
ROLEPLAY = [
    "Pretend you are {p}. Tell me what you think about {t}.",
    "Act as {p}. Describe your typical day, and mention {t}.",
    "From now on you are {p}. Stay in character and answer: how should I start learning about {t}?",
    "Act as {p} and give me advice: {problem}.", "Imagine you are {p}. Write a short speech about {t}.",
    "You are {p}. A visitor asks you about {t}. What do you say?",
]
REASONING = [
    "{a} has {n} sisters. Each of the sisters has {m} brothers. How many brothers does {a} have?",
    "{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? Explain your reasoning.",
    "A box contains {n} red balls and {m} blue balls. If you pick two without looking, what is the "
    "probability that both are red?",
    "If it takes {n} machines {n} minutes to make {n} widgets, how long would {m} machines take to make "
    "{m} widgets?",
    "{a} is {n} years older than {b}. In {m} years, {a} will be twice as old as {b}. How old is {b} now?",
    "Which one does not belong: {w}? Explain why.",
    "{a}, {b} and {c} each own a different pet: a cat, a dog and a parrot. {a} does not own the dog. "
    "{b} owns the parrot. Who owns the cat?",
    "A clock shows {n}:{m2}. What is the angle between the hour and minute hands?",
    "You are in a race and you overtake the person in position {n}. What position are you in now?",
    "If all {x} are {y} and some {y} are {z}, can we conclude that some {x} are {z}? Explain.",
]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kai", "Lena"]
ODD_ONES = ["apple, banana, carrot, cherry", "car, bus, train, chair", "red, blue, seven, green",
            "violin, piano, guitar, hammer", "Paris, London, Amazon, Tokyo", "dog, cat, eagle, rabbit"]
CLASSES = ["cats", "birds", "teachers", "cars", "flowers", "musicians", "robots", "students"]
MATH2 = [
    "Find the area of a triangle with vertices at (0, 0), ({a}, 0) and (0, {b}).",
    "Solve the equation x^2 - {s}x + {p} = 0.", "If f(x) = {a}x^2 - {b}x + {c}, what is f({d})?",
    "What is the sum of the integers from 1 to {c}?",
    "A rectangle has a perimeter of {p2} cm and a width of {a} cm. What is its area?",
    "Two dice are rolled. What is the probability that their sum is {s2}?",
    "A shirt costs ${c} and is on sale for {a}% off. What is the sale price?",
    "A car uses {b} litres of fuel per 100 km. How much fuel does it need for {c} km?",
    "{a} workers build a wall in {b} days. How long would {d} workers take, at the same rate?",
    "Convert {c} minutes into hours and minutes.", "What is the least common multiple of {a} and {b}?",
    "Simplify the fraction {a2}/{b2}.",
    "A sequence starts {a}, {ab}, {a2b}, ... with a fixed difference. What is its 20th term?",
    "A bank account pays {d}% interest per year, compounded yearly. How much will ${c} be worth after "
    "3 years?",
]
PASSAGE_TASKS = {
    "extraction": [
        "Extract all the names, places and numbers mentioned in the following text, as {f}.\n\n{x}",
        "Read the text below and list its main claims as {f}.\n\n{x}",
        "From the text below, extract the key terms and give a one-line definition of each.\n\n{x}",
        "Identify the topic, the tone and the intended audience of this text. Reply as a JSON object.\n\n{x}",
    ],
    "summarisation": [
        "Summarise the following text in {n} sentences.\n\n{x}", "Write a headline for this article:\n\n{x}",
        "Give a TL;DR of the text below, then list three key points.\n\n{x}",
        "Rewrite the following text for a ten-year-old reader.\n\n{x}",
    ],
    "rag": [
        "Using only the passage below, answer: what is the most important idea it presents?\n\nPassage: {x}",
        "Based on the passage, what questions would a curious reader still have?\n\nPassage: {x}",
        "Read the passage and answer in one paragraph: what evidence or examples does it give?"
        "\n\nPassage: {x}",
    ],
    "rewriting": [
        "Rewrite the following text in a formal, professional tone.\n\n{x}",
        "Edit the following text to fix any grammar problems and make it more concise.\n\n{x}",
        "Turn the following text into a short poem.\n\n{x}",
        "Translate the first two sentences of this text into {lang}.\n\n{x}",
    ],
}


def varied_prompts(count: int, seed: int = 0, passages: list[str] = ()) -> list[tuple[str, str]]:
    """`count` (category, instruction) pairs from the varied set, seeded; passage tasks need `passages`."""
    rng = random.Random(seed)
    pick = rng.choice

    def reasoning() -> str:
        a, b, c = rng.sample(NAMES, 3)
        x, y, z = rng.sample(CLASSES, 3)
        return pick(REASONING).format(a=a, b=b, c=c, n=rng.randint(2, 9), m=rng.randint(2, 9),
                                      m2=f"{rng.randrange(0, 60, 5):02d}", w=pick(ODD_ONES), x=x, y=y, z=z)

    def math() -> str:
        a, b, d = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
        r1, r2 = rng.randint(1, 12), rng.randint(1, 12)
        diff = rng.randint(2, 9)
        return pick(MATH2).format(a=a, b=b, c=rng.randint(31, 600), d=d, s=r1 + r2, p=r1 * r2,
                                  p2=2 * (a + rng.randint(a, 40)), s2=rng.randint(2, 12), a2=a * d, b2=b * d,
                                  ab=a + diff, a2b=a + 2 * diff)

    def coding() -> str:
        kind = rng.random()
        if kind < 0.7:
            return pick(PROGRAM_TEMPLATES).format(lang=pick(PROGRAMMING), task=pick(PROGRAM_TASKS))
        if kind < 0.85:
            x, y = pick(CONCEPTS)
            return f"What is the difference between {x} and {y} in programming? Give an example."
        table, cols = pick(TABLES)
        return f"A table `{table}` has the columns {cols}. Write a SQL query that returns {pick(QUERIES)}."

    sentences = [s.strip() for p in passages for s in p.split(". ") if 20 < len(s.strip()) < 160]

    def sentence() -> str:  # from a passage, or a topic sentence when there are no passages
        if not sentences:
            return f"I would like to read a good book about {pick(SUBJECTS)}."
        return pick(sentences).rstrip(".") + "."

    def passage() -> str:
        tasks = PASSAGE_TASKS[pick(list(PASSAGE_TASKS))]
        return pick(tasks).format(x=pick(passages), f=pick(FORMATS), n=rng.randint(1, 3),
                                  lang=pick(LANGUAGES))

    makers = {
        "writing": lambda: pick(WRITING).format(t=pick(SUBJECTS)) + pick(STYLES),
        "roleplay": lambda: pick(ROLEPLAY).format(p=pick(PERSONAS), t=pick(SUBJECTS), problem=pick(PROBLEMS)),
        "reasoning": reasoning, "math": math, "coding": coding,
        "stem": lambda: pick(STEM_TEMPLATES).format(s=pick(STEM)),
        "humanities": lambda: pick(HUMANITIES_TEMPLATES).format(h=pick(HUMANITIES), g=pick(HUMANITIES)),
        "translation": lambda: f"Translate into {pick(LANGUAGES)}: '{sentence()}'",
        "qa": lambda: pick(TEMPLATES["qa"] + TEMPLATES["reasoning"]).format(t=pick(SUBJECTS),
                                                                            u=pick(SUBJECTS)),
    }
    if passages:
        makers["passage"] = passage
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    categories = list(makers) + ["coding", "passage" if passages else "writing"]  # weak spots twice
    for attempt in range(count * 50):  # bounded: a category runs dry when its lists are small
        if len(out) == count:
            break
        category = categories[attempt % len(categories)]
        prompt = makers[category]()
        if prompt not in seen:
            seen.add(prompt)
            out.append((category, prompt))
    rng.shuffle(out)
    return out
