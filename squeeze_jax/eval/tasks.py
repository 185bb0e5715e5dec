"""Seeded, deterministic long-context task generators.

Every task is a fixed context (the part a context index is built for) plus one or more questions with exact
answers. Lengths are controlled in tokens through a `count_tokens` callable so the generators stay independent
of any tokenizer implementation. The haystack is public-domain text bundled with the package
(`squeeze_jax/data/tinyshakespeare.txt`) or neutral filler sentences.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from importlib import resources

CountTokens = Callable[[str], int]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind", "lively",
    "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid", "wild", "young",
    "zesty", "bold", "crisp", "dim", "faint", "grand",
)
NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel",
    "umbrella", "violin", "walrus", "yacht", "zebra", "bridge", "castle", "desert", "forest", "glacier",
)
FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hector", "Ingrid", "Jonas", "Keiko",
    "Lorenzo", "Mira", "Nikolai", "Olga", "Pablo", "Quentin", "Rosa", "Samir", "Tamsin", "Ulrich", "Vera",
    "Walter", "Xenia",
    "Yusuf", "Zora", "Anton", "Beatrix", "Cyrus", "Delia",
)
CITIES = (
    "Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Nairobi", "Quito", "Prague", "Seoul", "Tunis",
    "Vienna",
    "Zagreb", "Madrid", "Helsinki", "Bogota", "Manila", "Athens", "Warsaw", "Santiago", "Ottawa", "Canberra",
    "Reykjavik", "Havana", "Tbilisi", "Riga", "Sofia", "Lusaka", "Muscat", "Bern",
)
@dataclasses.dataclass(frozen=True)
class Question:
    """One user question against a fixed context, with its exact answer."""

    text: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Task:
    """A fixed context and the questions asked against it; `meta["needles"]` lists the planted sentences."""

    kind: str
    context: str
    questions: tuple[Question, ...]
    meta: dict = dataclasses.field(default_factory=dict)


def haystack_text() -> str:
    """The bundled public-domain natural-text haystack."""
    return (resources.files("squeeze_jax") / "data" / "tinyshakespeare.txt").read_text()


def _digits(rng: random.Random, n: int) -> str:
    first = str(rng.randint(1, 9))
    return first + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def _fill(source: str, n_tokens: int, count_tokens: CountTokens, start: int = 0) -> str:
    """A prefix of `source` (repeated as needed, from `start`) with about `n_tokens` tokens."""
    if n_tokens <= 0:
        return ""
    probe = source[start:start + 4000] or source[:4000]
    chars_per_token = max(len(probe) / max(count_tokens(probe), 1), 1.0)
    n_chars = int(n_tokens * chars_per_token)
    text = (source * (2 + n_chars // max(len(source), 1)))[start:start + n_chars]
    # Correct the estimate once with the real count.
    real = count_tokens(text)
    if real > 0 and abs(real - n_tokens) > 0.02 * n_tokens:
        n_chars = int(n_chars * n_tokens / real)
        text = (source * (2 + n_chars // max(len(source), 1)))[start:start + n_chars]
    cut = text.rfind("\n")
    return text[: cut + 1] if cut > len(text) // 2 else text


def _insert_at_depth(haystack: str, needle: str, depth: float) -> str:
    """Insert `needle` at a sentence/line boundary near fraction `depth` of `haystack`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pos = int(len(haystack) * depth)
    boundary = max(haystack.rfind("\n", 0, pos), haystack.rfind(". ", 0, pos) + 1)
    pos = boundary + 1 if boundary > 0 else 0
    return haystack[:pos] + needle + " " + haystack[pos:]


def _insert_paragraph_at_depth(haystack: str, paragraph: str, depth: float) -> str:
    """Insert `paragraph` as a paragraph of its own at the paragraph (else line) break nearest before `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pos = int(len(haystack) * depth)
    cut = haystack.rfind("\n\n", 0, pos)
    cut = cut + 2 if cut >= 0 else haystack.rfind("\n", 0, pos) + 1
    return haystack[:cut] + paragraph + "\n\n" + haystack[cut:]


def _check_len(n_tokens: int) -> None:
    if n_tokens < 64:
        raise ValueError(f"n_tokens must be >= 64, got {n_tokens}")


def passkey(n_tokens: int, depth: float, seed: int, count_tokens: CountTokens) -> Task:
    """Filler text with a 5-digit pass key planted at `depth`; one question."""
    _check_len(n_tokens)
    rng = random.Random(seed)
    key = _digits(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    hay = _fill(FILLER, n_tokens - count_tokens(needle) - 8, count_tokens)
    context = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               + _insert_at_depth(hay, needle, depth))
    q = Question("What is the pass key? The pass key is", key)
    meta = {"depth": depth, "seed": seed, "n_tokens": n_tokens, "needles": [needle]}
    return Task("passkey", context, (q,), meta)


def _magic_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in used:
            used.add(key)
            return key


def needles(n_tokens: int, seed: int, count_tokens: CountTokens, *, n_keys: int = 1, n_values: int = 1,
            n_queries: int = 1, depths: tuple[float, ...] | None = None) -> Task:
    """RULER-style magic-number needles in the natural-text haystack.

    `n_keys` distinct keys are planted (the first `n_queries` are asked about); the first key carries
    `n_values` values (multi-value). With defaults this is the single-needle task.
    """
    _check_len(n_tokens)
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"need 1 <= n_queries <= n_keys, got n_queries={n_queries}, n_keys={n_keys}")
    rng = random.Random(seed)
    used: set[str] = set()
    planted: list[tuple[str, list[str]]] = []
    for i in range(n_keys):
        key = _magic_key(rng, used)
        vals = [_digits(rng, 7) for _ in range(n_values if i == 0 else 1)]
        planted.append((key, vals))
    sentences = [f"One of the special magic numbers for {k} is: {v}." for k, vs in planted for v in vs]
    body = _fill(haystack_text(), n_tokens - sum(count_tokens(s) for s in sentences) - 40, count_tokens,
                 start=rng.randrange(0, 100000))
    if depths is None:
        depths = tuple(sorted(rng.uniform(0.05, 0.95) for _ in sentences))
    if len(depths) != len(sentences):
        raise ValueError(f"got {len(depths)} depths for {len(sentences)} needles")
    for s, d in sorted(zip(sentences, depths), key=lambda p: -p[1]):
        body = _insert_at_depth(body, s, d)
    intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
    context = intro + body
    questions = []
    for key, vals in planted[:n_queries]:
        if len(vals) == 1:
            questions.append(Question(f"What is the special magic number for {key}? The special magic number "
                                      f"for {key} is:", vals[0]))
        else:
            questions.append(Question(f"What are all the special magic numbers for {key}? They are:",
                                      ", ".join(vals)))
    kind = "needle" if (n_keys, n_values, n_queries) == (1, 1, 1) else "multi_needle"
    return Task(kind, context, tuple(questions), {"seed": seed, "n_tokens": n_tokens, "depths": list(depths),
                                                "needles": sentences})


def variable_tracking(n_tokens: int, seed: int, count_tokens: CountTokens, *, n_hops: int = 3) -> Task:
    """RULER variable tracking: a value assigned then passed along a chain of variables inside filler."""
    _check_len(n_tokens)
    rng = random.Random(seed)
    value = _digits(rng, 5)
    names = rng.sample([f"{a.upper()}{b.upper()}{c.upper()}" for a in "abcdefghij" for b in "klmnopq"
                        for c in "rstuvwxyz"], n_hops + 1)
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(n_hops)]
    body = _fill(FILLER, n_tokens - sum(count_tokens(s) for s in stmts) - 30, count_tokens)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in stmts)
    for s, d in sorted(zip(stmts, depths), key=lambda p: -p[1]):
        body = _insert_at_depth(body, s, d)
    q = Question(f"Find all variables that are assigned the value {value}. Answer: VAR", " ".join(names))
    return Task("variable_tracking", "Memorize and track the chain(s) of variable assignment.\n" + body, (q,),
                {"seed": seed, "n_hops": n_hops, "needles": stmts})


# (fact, question, answer pool): every fact is about another person and another attribute; the answer cue is the
# fact's words up to `{ans}`. Answer words are common English words absent from the haystack; `None` = a number.
_FACT_TEMPLATES: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("The favourite dessert of {name} is {ans}.", "What is the favourite dessert of {name}?",
     ("tiramisu", "baklava", "cheesecake", "pavlova", "brownies", "pancakes")),
    ("In the town band, {name} plays the {ans}.", "Which instrument does {name} play in the town band?",
     ("saxophone", "accordion", "harmonica", "banjo", "ukulele", "xylophone")),
    ("The pet that {name} keeps at home is a {ans}.", "Which pet does {name} keep at home?",
     ("penguin", "tortoise", "hamster", "ferret", "parakeet", "chinchilla")),
    ("The sport that {name} plays every weekend is {ans}.", "Which sport does {name} play every weekend?",
     ("volleyball", "badminton", "basketball", "hockey", "tennis", "golf")),
    ("{name} rides a {ans} to work.", "What does {name} ride to work?",
     ("scooter", "motorcycle", "tractor", "bicycle", "skateboard", "unicycle")),
    ("The fruit that {name} eats every morning is {ans}.", "Which fruit does {name} eat every morning?",
     ("papaya", "mango", "kiwi", "pineapple", "avocado", "coconut")),
    ("At the cafe, {name} always orders a cup of {ans}.", "What does {name} always order at the cafe?",
     ("espresso", "cappuccino", "cocoa", "lemonade", "latte", "matcha")),
    ("The language that {name} is learning is {ans}.", "Which language is {name} learning?",
     ("Portuguese", "Swahili", "Icelandic", "Japanese", "Hungarian", "Finnish")),
    ("The profession of {name} is {ans}.", "What is the profession of {name}?",
     ("dentistry", "plumbing", "pharmacy", "carpentry", "architecture", "accounting")),
    ("The flower that {name} grows on the balcony is the {ans}.", "Which flower does {name} grow on the balcony?",
     ("orchid", "tulip", "sunflower", "magnolia", "begonia", "daisy")),
    ("Last summer {name} travelled to {ans} by plane.", "Which country did {name} travel to last summer?",
     ("Brazil", "Canada", "Kenya", "Norway", "Chile", "Vietnam")),
    ("The dish that {name} cooks best is {ans}.", "Which dish does {name} cook best?",
     ("pizza", "lasagna", "sushi", "burritos", "omelettes", "curry")),
    ("On Sundays {name} practises {ans} in the park.", "What does {name} practise in the park on Sundays?",
     ("yoga", "karate", "chess", "origami", "juggling", "photography")),
    ("The music that {name} likes most is {ans}.", "Which music does {name} like most?",
     ("jazz", "reggae", "opera", "techno", "salsa", "tango")),
    ("At the zoo, the favourite animal of {name} is the {ans}.", "Which animal at the zoo does {name} like most?",
     ("giraffe", "kangaroo", "zebra", "koala", "panda", "rhino")),
    ("{name} painted the kitchen door {ans}.", "Which colour did {name} paint the kitchen door?",
     ("turquoise", "lavender", "emerald", "magenta", "beige", "scarlet")),
    ("The locker number of {name} is {ans}.", "What is the locker number of {name}?", None),
    ("The phone extension of {name} is {ans}.", "What is the phone extension of {name}?", None),
    ("{name} lives in apartment number {ans}.", "In which apartment number does {name} live?", None),
    ("The bicycle lock code of {name} is {ans}.", "What is the bicycle lock code of {name}?", None),
    ("The library card number of {name} is {ans}.", "What is the library card number of {name}?", None),
    ("{name} takes the bus with route number {ans}.", "Which bus route number does {name} take?", None),
    ("The old oak tree was planted by {name} in the year {ans}.", "In which year did {name} plant the old oak tree?",
     None),
    ("The parking space of {name} is number {ans}.", "Which number is the parking space of {name}?", None),
)


def _fact(template: tuple[str, str, tuple[str, ...] | None], name: str, rng: random.Random,
          used_numbers: set[str]) -> tuple[str, Question]:
    """One planted sentence and its question (`Question: ...` then the fact's words up to the answer as cue)."""
    fact_t, question_t, pool = template
    if pool is None:
        answer = _digits(rng, 4)
        while answer in used_numbers:
            answer = _digits(rng, 4)
        used_numbers.add(answer)
    else:
        answer = rng.choice(pool)
    fact = fact_t.format(name=name, ans=answer)
    cue = fact_t.split("{ans}")[0].rstrip().format(name=name)
    return fact, Question(f"Question: {question_t.format(name=name)}\nAnswer: {cue}", answer)


def many_facts(n_tokens: int, seed: int, count_tokens: CountTokens, *, n_facts: int = 20) -> Task:
    """One long document with `n_facts` planted facts and one question per fact.

    The setting a context index exists for: one fixed context, many questions. Every fact is about another
    person and another attribute, its answer is a 4-digit number or a word that the haystack does not contain,
    and its question ends with the fact's own words as the answer cue. Each fact is a paragraph of its own at
    evenly spread, jittered depths, in question order.
    """
    _check_len(n_tokens)
    limit = min(len(FIRST_NAMES), len(_FACT_TEMPLATES))
    if not 1 <= n_facts <= limit:
        raise ValueError(f"n_facts must be in [1, {limit}], got {n_facts}")
    rng = random.Random(seed)
    people = rng.sample(FIRST_NAMES, n_facts)
    templates = rng.sample(_FACT_TEMPLATES, n_facts)
    used: set[str] = set()
    facts, questions = zip(*(_fact(t, name, rng, used) for t, name in zip(templates, people)))
    body = _fill(haystack_text(), n_tokens - sum(count_tokens(f) for f in facts) - 30, count_tokens,
                 start=rng.randrange(0, 100000))
    depths = [(i + rng.uniform(0.2, 0.8)) / n_facts for i in range(n_facts)]
    for f, d in sorted(zip(facts, depths), key=lambda p: -p[1]):
        body = _insert_paragraph_at_depth(body, f, d)
    return Task("many_facts", "Read the document. It contains facts about people.\n" + body, tuple(questions),
                {"seed": seed, "n_facts": n_facts, "depths": depths, "needles": list(facts)})


def mqar(n_pairs: int, n_queries: int, seed: int) -> Task:
    """Multi-query associative recall over word-number pairs (no haystack text)."""
    if not 1 <= n_queries <= n_pairs:
        raise ValueError(f"need 1 <= n_queries <= n_pairs, got {n_queries}, {n_pairs}")
    rng = random.Random(seed)
    used: set[str] = set()
    pairs = [(_magic_key(rng, used), _digits(rng, 3)) for _ in range(n_pairs)]
    context = "Remember these pairs.\n" + "\n".join(f"{k}: {v}" for k, v in pairs)
    asked = rng.sample(pairs, n_queries)
    qs = tuple(Question(f"What number was paired with {k}? Answer:", v) for k, v in asked)
    return Task("mqar", context, qs, {"seed": seed, "n_pairs": n_pairs})


def score_answer(generated: str, answer: str) -> bool:
    """Exact match: every comma/space separated part of the answer appears in the generated text."""
    gen = generated.lower()
    parts = [p.strip().lower() for p in answer.replace(",", " ").split()]
    return all(p in gen for p in parts if p)
