"""The embedded default task: support tickets -> compact JSON triage records.

A seeded generator writes Alpaca-format JSONL. Like real scraped data it carries
flaws for the cleaning stage to remove: exact duplicates, near duplicates (case,
spacing, punctuation, one changed word) and a few over-long records (pasted logs).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = (
    "Triage this support ticket as JSON with keys category (billing, bug, account, shipping, "
    "feature_request), priority (low, medium, high, urgent), product, sentiment (negative, neutral, positive)."
)

PRODUCTS = [
    "mobile app", "web dashboard", "router x200", "smart thermostat", "billing portal",
    "desktop client", "api gateway", "wireless earbuds", "smartwatch s3", "cloud backup",
]

# Phrases that signal each field; the reference JSON is derived from the choices.
CATEGORY_PHRASES = {
    "billing": [
        "I was charged twice for my {product} subscription this month",
        "my invoice for the {product} shows the wrong amount",
        "the refund for my {product} order never arrived",
        "I keep getting billed for the {product} after cancelling",
    ],
    "bug": [
        "the {product} crashes every time I open the settings page",
        "the {product} freezes after the latest update",
        "sync in the {product} fails with an error code",
        "the {product} shows a blank screen on start",
    ],
    "account": [
        "I cannot log in to my {product} account anymore",
        "the password reset email for the {product} never comes",
        "my {product} account was locked without warning",
        "I need to change the email address on my {product} account",
    ],
    "shipping": [
        "my {product} order has not shipped after two weeks",
        "the tracking number for my {product} does not work",
        "the {product} arrived damaged in the box",
        "I received the wrong item instead of the {product}",
    ],
    "feature_request": [
        "it would be great if the {product} had a dark mode",
        "please add export to spreadsheet in the {product}",
        "could the {product} support more than one user profile",
        "I would love keyboard shortcuts in the {product}",
    ],
}

PRIORITY_PHRASES = {
    "low": ["No rush, whenever you have time.", "Just letting you know, not urgent."],
    "medium": ["Could you look into it this week?", "Please check when you can."],
    "high": ["This is blocking my work today.", "Please fix this soon, it affects my team."],
    "urgent": ["This is an emergency, we are losing customers right now!", "URGENT: please respond immediately."],
}

SENTIMENT_PHRASES = {
    "negative": ["I am really frustrated with this.", "Honestly this is unacceptable."],
    "neutral": ["Thanks.", "Regards."],
    "positive": ["I love the product otherwise, thanks for the great work!", "You have been great so far, thank you!"],
}

GREETINGS = ["Hi,", "Hello support,", "Hey team,", "Good morning,", ""]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]


def _ticket(rng: random.Random) -> dict:
    category = rng.choice(list(CATEGORY_PHRASES))
    priority = rng.choice(list(PRIORITY_PHRASES))
    sentiment = rng.choice(list(SENTIMENT_PHRASES))
    product = rng.choice(PRODUCTS)
    body = rng.choice(CATEGORY_PHRASES[category]).format(product=product)
    parts = [
        rng.choice(GREETINGS),
        body[0].upper() + body[1:] + ".",
        rng.choice(PRIORITY_PHRASES[priority]),
        rng.choice(SENTIMENT_PHRASES[sentiment]),
        f"- {rng.choice(NAMES)} (order #{rng.randint(10000, 99999)})",
    ]
    text = " ".join(p for p in parts if p)
    label = {"category": category, "priority": priority, "product": product, "sentiment": sentiment}
    return {"instruction": INSTRUCTION, "input": text, "output": json.dumps(label, separators=(",", ":"))}


def _near_duplicate(record: dict, rng: random.Random) -> dict:
    text = record["input"]
    edit = rng.choice(["case", "space", "punct", "word"])
    if edit == "case":
        text = text.lower()
    elif edit == "space":
        text = text.replace(" ", "  ", 2)
    elif edit == "punct":
        text = text.replace(".", "!", 1)
    else:
        text = text.replace("the ", "this ", 1)
    return {**record, "input": text}


def _overlong(record: dict, rng: random.Random) -> dict:
    log = " ".join(f"[{rng.randint(0, 9999):04d}] worker-{rng.randint(1, 9)} retry failed: timeout" for _ in range(400))
    return {**record, "input": record["input"] + " Here is the full log: " + log}


def generate(num_records: int, seed: int) -> list[dict]:
    """Records in Alpaca format: ~8% exact duplicates, ~8% near duplicates, ~1.5% over-long."""
    return generate_with_plan(num_records, seed)[0]


def generate_with_plan(num_records: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The records, and what was planted: {"index", "kind": exact|near|overlong, "of": source index}.
    Tests use the plan to check that cleaning removes exactly what was planted."""
    rng = random.Random(seed)
    records: list[dict] = []
    plan: list[dict] = []
    while len(records) < num_records:
        roll = rng.random()
        if records and roll < 0.16:
            source = rng.randrange(len(records))  # same draw as rng.choice(records)
            kind = "exact" if roll < 0.08 else "near"
            plan.append({"index": len(records), "kind": kind, "of": source})
            records.append(dict(records[source]) if kind == "exact" else _near_duplicate(records[source], rng))
        elif roll < 0.175:
            plan.append({"index": len(records), "kind": "overlong", "of": None})
            records.append(_overlong(_ticket(rng), rng))
        else:
            records.append(_ticket(rng))
    return records, plan


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path

