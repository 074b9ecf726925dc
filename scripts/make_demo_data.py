"""Write align's demo datasets into datasets/ (run from the repository root).

The demo task is controlled sentiment, as in the DPO paper's IMDb experiment but with a rule as the
judge: a prompt asks for a short review, and a review's sentiment is the share of its sentiment words
that are positive. The SFT data mixes positive and negative reviews, so an SFT policy writes both and
alignment has room to push it towards positive ones.

The second task, for GRPO with a verifiable reward, is single-digit addition with known answers
(``demo_math_*``): the ``exact_answer`` reward function compares a response's final answer with the
prompt row's ``answer`` column. Some ordered pairs are held out of every training file and asked only in
the test file, so the score measures answers the policy was never shown.

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
MATH_HELD_OUT = 20  # ordered pairs (a, b) of the 100 asked only in the test file


def math_reply(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}\nAnswer: {a + b}"


def math_task(out: Path) -> None:
    # Its own generator, so that the sentiment files above stay byte-identical whatever this task does.
    rng = random.Random(7)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    held_out, train = pairs[:MATH_HELD_OUT], pairs[MATH_HELD_OUT:]

    def questions(pool: list[tuple[int, int]], count: int) -> list[tuple[int, int, str]]:
        rows = []
        for _ in range(count):
            a, b = rng.choice(pool)
            rows.append((a, b, rng.choice(QUESTIONS).format(a=a, b=b)))
        return rows

    write(
        out / "demo_math_sft.json",
        [{"instruction": q, "input": "", "output": math_reply(a, b)} for a, b, q in questions(train, 512)],
    )
    with (out / "demo_math_prompts.jsonl").open("w", encoding="utf-8") as prompts:
        for a, b, q in questions(train, 512):
            prompts.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": str(a + b)}) + "\n")
    # Every held-out pair in every wording, once: a test set without repeats.
    with (out / "demo_math_test.jsonl").open("w", encoding="utf-8") as test:
        for a, b in held_out:
            for template in QUESTIONS:
                q = template.format(a=a, b=b)
                test.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
