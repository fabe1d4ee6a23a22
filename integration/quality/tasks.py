"""Long-context tasks built in code from texts that ship with Python and Debian.

    cases = passkey_cases(tok, lengths=[8000], depths=[0.1, 0.5, 0.9], seed=0)
    text = natural_text()          # Python's reference docs + Debian's licence texts

Every case is a prompt (token ids, ending right before the answer) and the answer string; the
prompt is built to an exact token length with the needle(s) at a chosen depth (fraction of the
haystack before the needle). Nothing is downloaded:

- `pydoc_data.topics` (the Python language reference as plain text, in every CPython install)
- `/usr/share/common-licenses/*` (Debian's base-files: GPL, LGPL, Apache, MPL, ... texts)

Haystacks are paragraphs of those texts in a seeded random order; code and grammar blocks
(indented lines) are dropped so the filler reads as prose.
"""

from __future__ import annotations

import dataclasses
import glob
import random
import re

LICENSE_DIR = "/usr/share/common-licenses"

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n\n")
CITIES = ["Berlin", "Lisbon", "Nairobi", "Osaka", "Quito", "Oslo", "Cairo", "Lima", "Hanoi",
          "Dublin", "Perth", "Tunis", "Sofia", "Riga", "Accra", "Minsk"]
WORDS = ["tangerine", "harbor", "velvet", "lantern", "meadow", "copper", "falcon", "glacier",
         "pepper", "saddle", "thistle", "walnut"]


@dataclasses.dataclass
class Case:
    task: str          # passkey | needle_number | needle_word | multikey
    length: int        # prompt tokens
    depth: float       # needle position as a fraction of the haystack (multikey: the asked key)
    prompt_ids: list[int]
    answer: str
    index: int = 0     # case number within (task, length, depth)

    @property
    def name(self) -> str:
        return f"{self.task}/L{self.length}/d{self.depth:.2f}/{self.index}"


def _prose_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue  # code, grammar, tables
        words = " ".join(line.strip() for line in lines).split()
        if len(words) < 12 or set("".join(words)) <= set("*=-~^"):
            continue
        out.append(" ".join(words))
    return out


def natural_paragraphs() -> list[str]:
    """Prose paragraphs of the Python reference (pydoc_data) and Debian's licence texts."""
    import pydoc_data.topics
    paras = []
    for key in sorted(pydoc_data.topics.topics):
        paras += _prose_paragraphs(pydoc_data.topics.topics[key])
    for path in sorted(glob.glob(f"{LICENSE_DIR}/*")):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                paras += _prose_paragraphs(f.read())
        except (IsADirectoryError, FileNotFoundError):
            continue
    if len(paras) < 100:
        raise RuntimeError(f"found only {len(paras)} prose paragraphs in pydoc_data and "
                           f"{LICENSE_DIR}; the haystacks need more text")
    return paras


def natural_text() -> str:
    """Long natural text for perplexity: the Python reference's prose, in its own order."""
    import pydoc_data.topics
    parts = []
    for key in sorted(pydoc_data.topics.topics):
        parts += _prose_paragraphs(pydoc_data.topics.topics[key])
    return "\n\n".join(parts)


def _fit(tok, head: str, needles: list[tuple[float, str]], question: str, length: int,
         filler_paras: list[str]) -> list[int]:
    """Token ids of head + haystack (needles at their depths) + question, exactly `length`
    tokens long. Filler paragraphs are tokenized once and cut at a paragraph boundary or
    mid-paragraph to hit the length."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    head_ids, question_ids = enc(head), enc(question)
    needle_ids = [(d, enc(" " + n.strip() + "\n\n")) for d, n in needles]
    room = length - len(head_ids) - len(question_ids) - sum(len(n) for _, n in needle_ids)
    if room <= 0:
        raise ValueError(f"length {length} is too short for the prompt's fixed parts")
    hay: list[int] = []
    for para in filler_paras:
        if len(hay) >= room:
            break
        hay += enc(para + "\n\n")
    if len(hay) < room:
        raise ValueError(f"not enough filler text for {length} tokens")
    hay = hay[:room]
    # Insert needles from the deepest first so earlier offsets stay valid; snap each offset to
    # the end of a paragraph boundary token when one is near.
    newline = set(enc("\n\n")) | set(enc(".\n\n"))
    for depth, ids in sorted(needle_ids, key=lambda x: -x[0]):
        at = int(round(depth * len(hay)))
        for back in range(0, 200):
            if at - back <= 0 or hay[at - back - 1] in newline:
                at = max(at - back, 0)
                break
        hay = hay[:at] + ids + hay[at:]
    ids = head_ids + hay + question_ids
    # Removing the overflow from the haystack's end keeps every needle in place.
    over = len(ids) - length
    if over > 0:
        cut = len(head_ids) + len(hay) - over
        ids = head_ids + hay[:cut - len(head_ids)] + question_ids
    return ids


def passkey_cases(tok, lengths, depths, per_point: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    filler = [PASSKEY_FILLER] * 4000
    for length in lengths:
        for depth in depths:
            for i in range(per_point):
                key = str(rng.randint(10000, 99999))
                needle = f"The pass key is {key}. Remember it. {key} is the pass key."
                ids = _fit(tok, PASSKEY_INTRO, [(depth, needle)],
                           "\nWhat is the pass key? The pass key is", length, filler)
                cases.append(Case("passkey", length, depth, ids, key, i))
    return cases


def needle_cases(tok, lengths, depths, per_point: int, seed: int) -> list[Case]:
    """Two needle variants among natural prose: a number keyed by a city, and a word."""
    rng = random.Random(seed + 1)
    paras = natural_paragraphs()
    cases = []
    for length in lengths:
        for depth in depths:
            for i in range(per_point):
                filler = paras[:]
                rng.shuffle(filler)
                city, number = rng.choice(CITIES), str(rng.randint(1000, 9999))
                ids = _fit(tok, "Read the document and answer the question after it.\n\n",
                           [(depth, f"The special magic number for {city} is {number}.")],
                           f"\nQuestion: What is the special magic number for {city}?\n"
                           f"Answer: The special magic number for {city} is", length, filler)
                cases.append(Case("needle_number", length, depth, ids, number, i))
                rng.shuffle(filler)
                word = rng.choice(WORDS)
                ids = _fit(tok, "Read the document and answer the question after it.\n\n",
                           [(depth, f"The secret word of the archive is {word}.")],
                           "\nQuestion: What is the secret word of the archive?\n"
                           "Answer: The secret word of the archive is", length, filler)
                cases.append(Case("needle_word", length, depth, ids, word, i))
    return cases


def multikey_cases(tok, lengths, per_point: int, keys: int, seed: int) -> list[Case]:
    """`keys` city -> number facts spread evenly through natural prose; one is asked. depth is
    the asked fact's depth."""
    rng = random.Random(seed + 2)
    paras = natural_paragraphs()
    cases = []
    for length in lengths:
        for i in range(per_point):
            filler = paras[:]
            rng.shuffle(filler)
            cities = rng.sample(CITIES, keys)
            numbers = [str(rng.randint(1000, 9999)) for _ in cities]
            depths = [(j + 0.5) / keys for j in range(keys)]
            ask = rng.randrange(keys)
            needles = [(d, f"The special magic number for {c} is {n}.")
                       for d, c, n in zip(depths, cities, numbers)]
            ids = _fit(tok, "Read the document and answer the question after it.\n\n", needles,
                       f"\nQuestion: What is the special magic number for {cities[ask]}?\n"
                       f"Answer: The special magic number for {cities[ask]} is", length, filler)
            cases.append(Case("multikey", length, depths[ask], ids, numbers[ask], i))
    return cases


def answer_state(generated: str, answer: str) -> str:
    """'hit' when the answer was produced, 'miss' when the text can no longer produce it,
    'open' otherwise (generation may go on)."""
    text = generated.strip().lstrip(":\"'").strip()
    if text.lower().startswith(answer.lower()):
        return "hit"
    if answer.lower().startswith(text.lower()):
        return "open"
    return "miss"
