"""Cleaning steps, each a function of a list of examples: exact and near-duplicate removal,
token length (drop or truncate), class balancing, and the seeded train/held-out split.

Deduplication runs before the split, so no held-out example has a near-duplicate in train.
Lengths are tokens of the model's own tokenizer with its chat template applied.
"""
from __future__ import annotations

import bisect
import hashlib
import random
import re
import zlib
from collections import Counter, defaultdict

from ftlab.data.records import DataError, Example

WORD = re.compile(r"\w+")
SHINGLED_CHARS = 20_000
# Records per fast-tokenizer call: big enough to use its Rust batching, small enough to bound memory.
TOKENIZE_BATCH = 1024


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _turns(example: Example) -> str:
    """Each turn's role and normalised text, apart: the same words split elsewhere between question
    and answer (a document cut at several points) are another example."""
    return "\x1e".join(f"{m['role']}\x1f{normalise(m['content'])}" for m in example.messages)


def drop_exact_duplicates(examples: list[Example]) -> tuple[list[Example], int]:
    """Keep the first of records with the same turns after whitespace and case normalisation."""
    seen, kept = set(), []
    for e in examples:
        key = hashlib.sha1(_turns(e).encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return kept, len(examples) - len(kept)


def _shingles(text: str, tag: bytes) -> set[bytes]:
    # Word bigrams: one changed word in a 50-word record leaves Jaccard ~0.93, above the usual
    # 0.9 (trigrams give ~0.89). Only the first and last SHINGLED_CHARS / 2 count, so a 10 MB line
    # costs little, and a question after a long shared document is still seen.
    if len(text) > SHINGLED_CHARS:
        text = f"{text[:SHINGLED_CHARS // 2]} {text[-SHINGLED_CHARS // 2:]}"
    words = WORD.findall(text)
    return {tag + " ".join(words[i: i + 2]).encode() for i in range(max(1, len(words) - 1))}


def _question_and_answer(example: Example) -> tuple[set[bytes], set[bytes]]:
    """What near-duplicate detection compares: the conversation before the answer without its
    system turns (a system prompt shared by every record, data.system_prompt's or the data's own,
    made records with different questions and answers look alike), and the answer."""
    question = normalise(" ".join(m["content"] for m in example.prompt if m["role"] != "system"))
    return _shingles(question, b"q:"), _shingles(normalise(example.reference), b"a:")


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _crc32(shingle: bytes) -> int:
    return zlib.crc32(shingle)  # ~5x faster than datasketch's default sha1, and as deterministic


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that make a pair 0.025 above the threshold a candidate with >= 99% probability
    while letting through the fewest pairs 0.15 below it (the cost: each candidate is checked).
    At 0.9 and 128 permutations: 10 x 12 (datasketch's own choice, 8 x 16, misses 6% at 0.93)."""
    def hit(j: float, b: int, r: int) -> float:
        return 1 - (1 - j ** r) ** b

    options = [(b, r) for r in range(1, num_perm + 1) for b in range(1, num_perm // r + 1)]
    near = min(1.0, threshold + 0.025)
    return min(((hit(threshold - 0.15, b, r), b, r) for b, r in options if hit(near, b, r) >= 0.99),
               default=(0, num_perm, 1))[1:]


def drop_near_duplicates(examples: list[Example], threshold: float, num_perm: int = 128) -> tuple[list[Example], int]:
    """Keep the first of each group whose questions and answers are both similar: Jaccard
    similarity of word bigrams >= threshold (records on one long shared document, with other
    questions or answers, are different examples).

    MinHash LSH over both sets together proposes candidates (see lsh_bands; the shingles are
    tagged by part, so the pair's Jaccard over both lies between the two parts' and is above the
    threshold when both are); the exact Jaccard of each part then decides, so no pair below the
    threshold is ever dropped."""
    if not 0 < threshold <= 1:
        raise DataError(f"data.near_dup_threshold={threshold}: must be in (0, 1]")
    # Imported here: datasketch loads scipy (~0.3 s), which a run on cached data never needs.
    from datasketch import MinHash, MinHashLSH

    parts = [_question_and_answer(e) for e in examples]
    # bulk() hashes all records in one vectorised pass.
    hashes = MinHash.bulk([question | answer for question, answer in parts], num_perm=num_perm, hashfunc=_crc32)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_bands(threshold, num_perm))
    kept = []
    for i, (e, m) in enumerate(zip(examples, hashes)):
        question, answer = parts[i]
        if any(_jaccard(question, parts[j][0]) >= threshold and _jaccard(answer, parts[j][1]) >= threshold
               for j in lsh.query(m)):
            continue
        lsh.insert(i, m)
        kept.append(e)
    return kept, len(examples) - len(kept)


def _max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry: a text of n characters has at least n / this many tokens."""
    return max(len(t) for t in tokenizer.get_vocab())


def measure(examples: list[Example], tokenizer) -> None:
    """Set prompt/response token counts as the chat template renders them, in fast batches.

    The whole record is tokenised once; the prompt's share is read off the token offsets,
    since the rendered prompt (with the generation prompt) is a prefix of the rendered record."""
    for start in range(0, len(examples), TOKENIZE_BATCH):
        batch = examples[start: start + TOKENIZE_BATCH]
        prompts = tokenizer.apply_chat_template([e.prompt for e in batch], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([e.messages for e in batch], tokenize=False)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
        for e, p, text, offsets in zip(batch, prompts, full, enc["offset_mapping"]):
            if text.startswith(p):
                n_prompt = bisect.bisect_left([o[0] for o in offsets], len(p))
            else:  # a template that renders the prompt differently inside the full record
                n_prompt = len(tokenizer(p, add_special_tokens=False)["input_ids"])
            e.prompt_tokens, e.response_tokens = n_prompt, len(offsets) - n_prompt


def _truncate(example: Example, tokenizer, max_tokens: int) -> bool:
    """Cut the final answer so the whole record fits; False when even the prompt does not."""
    for _ in range(3):  # re-tokenising after a cut can merge differently; converge in a few passes
        excess = example.tokens - max_tokens
        if excess <= 0:
            return True
        offsets = tokenizer(example.reference, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets) - excess
        if keep < 1:
            return False
        # Cut the text where the first dropped token starts: decoding the kept ids split a character
        # that spans tokens (CJK, accents, emoji in byte-level BPE) into U+FFFD, and could not converge.
        cut = example.reference[: offsets[keep][0]]
        if not cut.strip():
            return False
        example.messages[-1] = {**example.messages[-1], "content": cut}
        measure([example], tokenizer)
    return example.tokens <= max_tokens


def _chars(example: Example) -> int:
    return sum(len(m["content"]) for m in example.messages)


def fit_length(examples: list[Example], tokenizer, max_tokens: int, overlong: str) -> tuple[list[Example], dict]:
    """Drop (or, with overlong=truncate, cut the answer of) records longer than max_tokens."""
    if overlong not in ("drop", "truncate"):
        raise DataError(f"data.overlong={overlong}: use drop or truncate")
    # A record with more characters than this is over-long whatever its tokens, so a 10 MB line
    # is not tokenised just to be dropped.
    char_cap = max_tokens * _max_token_chars(tokenizer)
    huge = [_chars(e) > char_cap for e in examples]
    if overlong == "truncate":
        for e, is_huge in zip(examples, huge):
            if is_huge:  # cut characters first; the token-exact cut follows below
                room = max(0, char_cap - (_chars(e) - len(e.reference)))
                e.messages[-1] = {**e.messages[-1], "content": e.reference[:room]}
        huge = [_chars(e) > char_cap or not e.reference for e in examples]
    measure([e for e, is_huge in zip(examples, huge) if not is_huge], tokenizer)
    kept, counts = [], {"dropped_overlong": 0, "truncated_overlong": 0}
    for e, is_huge in zip(examples, huge):
        if not is_huge and e.tokens <= max_tokens:
            kept.append(e)
        elif not is_huge and overlong == "truncate" and _truncate(e, tokenizer, max_tokens):
            kept.append(e)
            counts["truncated_overlong"] += 1
        else:
            counts["dropped_overlong"] += 1
    return kept, counts


def balance(examples: list[Example], mode: str, cap: int | None, seed: int) -> tuple[list[Example], int]:
    """cap: at most `cap` records per class; rarest: every class downsampled to the rarest's count."""
    if mode == "none":
        return examples, 0
    if mode not in ("cap", "rarest"):
        raise DataError(f"data.balance={mode}: use none, cap or rarest")
    if mode == "cap" and (cap is None or cap < 1):
        raise DataError(f"data.balance=cap needs data.balance_cap >= 1 (records per class), not {cap}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_class[e.label].append(i)
    limit = cap if mode == "cap" else min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep = set()
    for label in sorted(by_class, key=str):
        members = by_class[label]
        keep.update(members if len(members) <= limit else rng.sample(members, limit))
    kept = [e for i, e in enumerate(examples) if i in keep]
    return kept, len(examples) - len(kept)


def class_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(str(e.label) for e in examples).items()))


def split(examples: list[Example], eval_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then the first eval_size (a count, or a fraction when < 1) are held out."""
    n_eval = int(round(eval_size * len(examples))) if eval_size < 1 else int(eval_size)
    if len(examples) < 2:  # no data.eval_size helps: say so, not "raise it"
        raise DataError(f"{len(examples)} cleaned record(s) left: a run needs at least 2, one to train on and one "
                        "to hold out")
    if n_eval < 1:
        raise DataError(f"data.eval_size={eval_size:g} holds out none of {len(examples)} cleaned records; raise it")
    if n_eval >= len(examples):
        raise DataError(f"data.eval_size={eval_size:g} leaves no train data from {len(examples)} cleaned records; "
                        "lower it or add data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held, train = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]
