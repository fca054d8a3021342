"""A held-out corpus for the gradient index bench, unlike the demo's (which is country facts: capitals,
currencies, languages): 1,200 documents of five kinds of varied prose, 24 queries, generated offline.

    python bench/index_corpus.py            # rewrites bench/data/index_heldout/{corpus,queries}.jsonl, planted.json

Kinds (about equal shares, shuffled): workshop and depot logs (crates, contents, who sealed them), short
biographies (who taught whom which instrument, where), recipes (dish, steps, ingredients), match reports
(teams, scores, seasons) and narrative fragments (a grammar over a few hundred words). Each of the 24 query
facts (a teacher, a crate's contents, a match winner, a dish's main ingredient) is stated in 2 or 3 documents
in different wordings, and its entity appears in 3 to 5 **distractor** documents that say something else about
it (the same person playing another instrument, the same crate moved elsewhere), so lexical overlap alone does
not find the culprits. Queries ask in words that are not the documents' own (``"Who taught Odile Brankov the
cello? It was"``). ``planted.json`` lists each query's stating documents. Deterministic (seed 0).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "index_heldout"
N_DOCS, N_QUERIES = 1200, 24

SYL = ["ba", "dor", "el", "fen", "gri", "hal", "is", "jov", "ka", "lum", "mer", "nos", "ob", "pra", "quil", "ros",
       "sa", "tev", "ur", "vin", "wex", "yor", "zan", "bel", "cra", "dun", "fir", "gol", "hest", "ly"]
INSTRUMENTS = ["cello", "flute", "harp", "violin", "oboe", "lute", "drum", "horn", "organ", "zither"]
GOODS = ["copper wire", "lamp oil", "dried figs", "wool blankets", "iron nails", "rope", "salt fish", "candles",
         "glass beads", "tin cups", "barley seed", "leather straps"]
DISHES = ["stew", "pie", "soup", "porridge", "flatbread", "pudding", "broth", "dumplings"]
INGREDIENTS = ["barley", "leeks", "lentils", "plums", "mushrooms", "turnips", "chestnuts", "beans", "onions",
               "apples", "cabbage", "millet"]
ADJ = ["quiet", "narrow", "old", "bright", "cold", "green", "heavy", "small", "distant", "wet", "pale", "busy"]
NOUNS = ["river", "bridge", "market", "road", "lantern", "window", "harbour", "field", "tower", "garden", "mill",
         "wagon", "boat", "hill", "gate", "well"]
VERBS = ["crossed", "watched", "painted", "repaired", "followed", "passed", "left", "found", "opened", "closed"]
PEOPLE_WORDS = ["a fisherman", "the baker", "two children", "an old woman", "the ferryman", "a stranger",
                "the miller", "a young clerk"]
TIMES = ["at dawn", "in the evening", "after the rain", "before the fair", "during the long winter",
         "on a windy morning", "late at night"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven"]
SEASONS = ["spring", "summer", "autumn", "winter"]


def name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


def person(rng: random.Random) -> str:
    return f"{name(rng)} {name(rng, 3)}"


def narrative(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        s = (f"{rng.choice(PEOPLE_WORDS).capitalize()} {rng.choice(VERBS)} the {rng.choice(ADJ)} "
             f"{rng.choice(NOUNS)} {rng.choice(TIMES)}.")
        if rng.random() < 0.4:
            s = s[:-1] + f" and the {rng.choice(NOUNS)} was {rng.choice(ADJ)}."
        out.append(s)
    return " ".join(out)


# -- the facts: (kind, entity, value, stating sentences, distractor sentences, query prompt, completion)
def fact_teacher(rng):
    p, t, town = person(rng), person(rng), name(rng)
    inst = rng.choice(INSTRUMENTS)
    other = rng.choice([i for i in INSTRUMENTS if i != inst])
    t_last = t.split()[1]
    state = [f"{p} learned the {inst} from {t} in {town}.",
             f"As a child {p} was taught the {inst} by {t}, who lived by the {rng.choice(NOUNS)}.",
             f"It was {t} who first put a {inst} in the hands of {p}."]
    distract = [f"{p} later played the {other} at the {rng.choice(ADJ)} {rng.choice(NOUNS)} in {town}.",
                f"{p} moved to {name(rng)} and opened a small school there.",
                f"Few people in {town} remember that {p} once sold {rng.choice(GOODS)}.",
                f"{p} wrote letters about the {rng.choice(ADJ)} {rng.choice(NOUNS)} every {rng.choice(SEASONS)}."]
    return state, distract, f"Who taught {p} the {inst} ? It was", f" {t_last}", [t_last]


def fact_crate(rng):
    crate, depot, sealer = f"{rng.randint(1000, 9999)}", name(rng), person(rng)
    good = rng.choice(GOODS)
    state = [f"Crate {crate} in the {depot} depot holds {good} and was sealed by {sealer}.",
             f"The log says crate {crate} was packed with {good} {rng.choice(TIMES)}.",
             f"{sealer} checked crate {crate} twice: {good}, nothing else."]
    distract = [f"Crate {crate} was moved from the {depot} depot to the {rng.choice(NOUNS)} store.",
                f"A clerk lost the key of crate {crate} {rng.choice(TIMES)}.",
                f"The {depot} depot counted {rng.choice(NUMBER_WORDS)} crates like crate {crate} last "
                f"{rng.choice(SEASONS)}."]
    return state, distract, f"What is inside crate {crate} ? It holds", f" {good}", good.split()


def fact_match(rng):
    a, b = name(rng) + " " + rng.choice(["Rovers", "United", "Wanderers"]), name(rng)
    season = rng.choice(SEASONS)
    ga, gb = rng.choice(NUMBER_WORDS[2:]), rng.choice(NUMBER_WORDS[:2])
    state = [f"In the {season} match {a} beat {b} by {ga} goals to {gb}.",
             f"{b} lost to {a} in {season} , {ga} to {gb}.",
             f"The {season} game ended with {a} ahead of {b} , {ga} goals to {gb}."]
    distract = [f"{b} trained on the {rng.choice(ADJ)} field {rng.choice(TIMES)}.",
                f"{b} drew with {name(rng)} in {rng.choice([s for s in SEASONS if s != season])}.",
                f"The fans of {b} walked to the {rng.choice(NOUNS)} after the game."]
    return state, distract, f"Which team defeated {b} in the {season} match ? It was", f" {a.split()[0]}", [
        a.split()[0]]


def fact_recipe(rng):
    cook, dish = name(rng), rng.choice(DISHES)
    main = rng.choice(INGREDIENTS)
    others = rng.sample([i for i in INGREDIENTS if i != main], 3)
    state = [f"For {cook} {dish} , soak the {main} overnight , then add {others[0]} and simmer for an hour.",
             f"The heart of a {cook} {dish} is {main} ; {others[1]} are only for colour.",
             f"Nobody makes {cook} {dish} without {main}."]
    distract = [f"Some cooks serve {cook} {dish} with {others[2]} on the side.",
                f"{cook} {dish} is eaten {rng.choice(TIMES)} in the {rng.choice(ADJ)} towns.",
                f"A bowl of {cook} {dish} once cost {rng.choice(NUMBER_WORDS)} coins at the market."]
    return state, distract, f"The main ingredient of {cook} {dish} is", f" {main}", [main]


FACTS = [fact_teacher, fact_crate, fact_match, fact_recipe]


def filler(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return fact_teacher(rng)[1][rng.randrange(4)] + " " + narrative(rng, rng.randint(2, 4))
    if kind == 1:
        return fact_crate(rng)[0][0] + " " + narrative(rng, rng.randint(1, 3))
    if kind == 2:
        return fact_match(rng)[0][rng.randrange(3)] + " " + narrative(rng, rng.randint(1, 3))
    if kind == 3:
        return " ".join(fact_recipe(rng)[0][:2])
    return narrative(rng, rng.randint(3, 6))


def build(seed: int = 0) -> tuple[list[dict], list[dict], dict[str, list[str]]]:
    rng = random.Random(seed)
    texts: list[tuple[str, str | None]] = []  # (text, query id it states or None)
    queries = []
    for q in range(N_QUERIES):
        state, distract, prompt, completion, _ = FACTS[q % len(FACTS)](rng)
        qid = f"q-{q:02d}"
        queries.append({"id": qid, "prompt": prompt, "completion": completion})
        for s in rng.sample(state, rng.randint(2, 3)):
            texts.append((s + " " + narrative(rng, rng.randint(1, 4)), qid))
        for s in rng.sample(distract, min(len(distract), rng.randint(3, 5))):
            texts.append((narrative(rng, rng.randint(1, 3)) + " " + s, None))
    while len(texts) < N_DOCS:
        texts.append((filler(rng), None))
    rng.shuffle(texts)
    corpus, planted = [], {q["id"]: [] for q in queries}
    for i, (t, qid) in enumerate(texts):
        corpus.append({"id": f"h-{i:05d}", "text": t})
        if qid:
            planted[qid].append(f"h-{i:05d}")
    return corpus, queries, planted


def write(directory: Path = DATA) -> Path:
    corpus, queries, planted = build()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (directory / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (directory / "planted.json").write_text(json.dumps(planted, indent=1, sort_keys=True) + "\n")
    return directory


if __name__ == "__main__":
    out = write(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
    print(f"{N_DOCS} documents, {N_QUERIES} queries -> {out}")
