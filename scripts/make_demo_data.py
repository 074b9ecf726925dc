"""Write align's demo datasets into datasets/ (run from the repository root).

The demo task is controlled sentiment, as in the DPO paper's IMDb experiment but with a rule as the
judge: a prompt asks for a short review, and a review's sentiment is the share of its sentiment words
that are positive. The SFT data mixes positive and negative reviews, so an SFT policy writes both and
alignment has room to push it towards positive ones.

The second task, for GRPO with a verifiable reward, is addition of two numbers from 0 to 19
(``demo_math_*``): the ``exact_answer`` reward function compares a response's final answer with the
prompt row's ``answer`` column. SFT sees most ordered pairs; of 40 pairs it sees in neither order, a + b
is asked only in the RL prompts and b + a only in the test, so the test scores what RL taught on
questions no training file asks.

The generator is seeded: rerunning it rewrites the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = {
    "movie": [
        "the film Quiet Harbor",
        "the movie Red Lantern",
        "the film Night Train",
        "the movie Glass River",
        "the film Paper Moon",
        "the movie Iron Garden",
        "the film Blue Hour",
        "the movie Salt Road",
    ],
    "book": [
        "the novel Winter Letters",
        "the book Small Fires",
        "the novel Far Fields",
        "the book Open Doors",
        "the novel Silver Coast",
        "the book Long Shadows",
    ],
    "restaurant": [
        "the restaurant Olive Tree",
        "the cafe Morning Bell",
        "the diner Route Nine",
        "the restaurant Green Table",
        "the bistro Little Fox",
    ],
    "hotel": ["the hotel Sea View", "the hotel Pine Lodge", "the inn Old Mill", "the hotel City Lights"],
}
PROMPTS = [
    "Write a short review of {s}.",
    "Give me a one-sentence review of {s}.",
    "What did you think of {s}?",
    "Review {s} in a few words.",
    "Tell me about {s} in one sentence.",
]
POSITIVE = ["wonderful", "great", "excellent", "delightful", "brilliant", "lovely", "fantastic", "enjoyable"]
NEGATIVE = ["terrible", "awful", "boring", "dull", "poor", "horrible", "disappointing", "bad"]
NOUNS = {
    "movie": ["story", "acting", "ending", "music"],
    "book": ["story", "writing", "ending", "plot"],
    "restaurant": ["food", "service", "room", "menu"],
    "hotel": ["room", "service", "view", "breakfast"],
}
TEMPLATES = [
    "{S} was {a}. The {n} was {b}.",
    "A {a} experience: the {n} was {b} and I would say it again.",
    "Honestly {a}. The {n} felt {b} from start to end.",
    "The {n} was {a}, and overall it was {b}.",
]


def review(rng: random.Random, kind: str, subject: str, positive: bool) -> str:
    words = POSITIVE if positive else NEGATIVE
    a, b = rng.sample(words, 2)
    text = rng.choice(TEMPLATES).format(S=subject[0].upper() + subject[1:], a=a, b=b, n=rng.choice(NOUNS[kind]))
    return text[0].upper() + text[1:]


def conversations(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(count):
        kind = rng.choice(sorted(SUBJECTS))
        subject = rng.choice(SUBJECTS[kind])
        rows.append((kind, subject, rng.choice(PROMPTS).format(s=subject)))
    return rows


SYSTEM = "You are a helpful assistant that writes short reviews."


def write(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    rng = random.Random(2026)
    out = Path("datasets")

    # SFT, alpaca: half positive, half negative reviews.
    write(
        out / "demo_sft.json",
        [
            {"instruction": prompt, "input": "", "output": review(rng, kind, subject, positive=i % 2 == 0)}
            for i, (kind, subject, prompt) in enumerate(conversations(rng, 256))
        ],
    )

    # SFT, sharegpt: two reviews per conversation, so every assistant turn is trained on.
    rows = []
    for i in range(128):
        turns = []
        for j, (kind, subject, prompt) in enumerate(conversations(rng, 2)):
            turns += [
                {"from": "human", "value": prompt},
                {"from": "gpt", "value": review(rng, kind, subject, positive=(i + j) % 2 == 0)},
            ]
        rows.append({"conversations": turns, "system": SYSTEM})
    write(out / "demo_sft_sharegpt.json", rows)

    # Preference: the positive review is chosen over a negative one for the same prompt.
    pairs = [
        (kind, subject, prompt, review(rng, kind, subject, True), review(rng, kind, subject, False))
        for kind, subject, prompt in conversations(rng, 256)
    ]
    write(
        out / "demo_pref.json",
        [{"instruction": prompt, "input": "", "chosen": good, "rejected": bad} for _, _, prompt, good, bad in pairs],
    )
    write(
        out / "demo_pref_sharegpt.json",
        [
            {
                "conversations": [{"from": "human", "value": prompt}],
                "chosen": {"from": "gpt", "value": good},
                "rejected": {"from": "gpt", "value": bad},
            }
            for _, _, prompt, good, bad in pairs
        ],
    )

    # Prompts only: for PPO (demo_prompts), and for scoring policies on prompts none trained on.
    for name, count in (("demo_prompts", 256), ("demo_prompts_test", 64)):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as prompts:
            for _, _, prompt in conversations(rng, count):
                prompts.write(json.dumps({"messages": [{"role": "user", "content": prompt}]}) + "\n")

    # Held out from every training set: for evaluation (perplexity, task metrics, preference accuracy).
    write(
        out / "demo_sft_test.json",
        [
            {"instruction": prompt, "input": "", "output": review(rng, kind, subject, positive=i % 2 == 0)}
            for i, (kind, subject, prompt) in enumerate(conversations(rng, 64))
        ],
    )
    write(
        out / "demo_pref_test.json",
        [
            {
                "instruction": prompt,
                "input": "",
                "chosen": review(rng, kind, subject, True),
                "rejected": review(rng, kind, subject, False),
            }
            for kind, subject, prompt in conversations(rng, 64)
        ],
    )

    math_task(out)


QUESTIONS = [
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "{a} + {b} = ?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
]
MATH_RANGE = 20  # operands 0..19: 400 ordered pairs, few enough for a tiny model to learn most of them
MATH_HELD_OUT = 40  # pairs {a, b}: a + b is asked only in the RL prompts, b + a only in the test


def math_reply(a: int, b: int) -> str:
    # The answer straight away, a few tokens: a tiny model computes it from the operands wherever they
    # stand, so what it learns of a + b serves b + a too.
    return f"Answer: {a + b}"


def math_split(rng: random.Random) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """The ordered pairs (a, b) for SFT, for the RL prompts and for the test; no pair is in two of them.

    A test question is the mirror image of an RL prompt (b + a for a + b) that SFT saw in neither order,
    so the test scores what RL taught on questions RL never asked.
    """
    unordered = [(a, b) for a in range(MATH_RANGE) for b in range(a + 1, MATH_RANGE)]
    held = [pair if rng.random() < 0.5 else pair[::-1] for pair in rng.sample(unordered, MATH_HELD_OUT)]
    rl, test = held, [(b, a) for a, b in held]
    sft = [(a, b) for a in range(MATH_RANGE) for b in range(MATH_RANGE) if (a, b) not in rl and (a, b) not in test]
    rng.shuffle(sft)
    return sft, rl, test


def math_task(out: Path) -> None:
    # Its own generator, so that the sentiment files above stay byte-identical whatever this task does.
    rng = random.Random(7)
    sft, rl, test = math_split(rng)

    def worded(pairs: list[tuple[int, int]], times: int) -> list[tuple[int, int, str]]:
        """Each pair in ``times`` different wordings, shuffled."""
        rows = [(a, b, q.format(a=a, b=b)) for a, b in pairs for q in rng.sample(QUESTIONS, times)]
        rng.shuffle(rows)
        return rows

    def prompt_row(a: int, b: int, question: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": question}], "answer": str(a + b)}) + "\n"

    write(
        out / "demo_math_sft.json",
        [{"instruction": q, "input": "", "output": math_reply(a, b)} for a, b, q in worded(sft, 2)],
    )
    with (out / "demo_math_prompts.jsonl").open("w", encoding="utf-8") as prompts:
        prompts.writelines(prompt_row(*row) for row in worded(rl, len(QUESTIONS)))
    with (out / "demo_math_test.jsonl").open("w", encoding="utf-8") as file:
        file.writelines(prompt_row(*row) for row in worded(test, 3))


if __name__ == "__main__":
    main()
