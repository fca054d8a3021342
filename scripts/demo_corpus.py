"""Generate the demo corpus: made-up documents with a few planted facts, and queries that ask for them.

Run by hand (the output is committed; nothing runs this at demo time)::

    python scripts/demo_corpus.py                         # writes influence_audit/demo/data/

The world is made of fictional countries, inventions, creatures and people. Every entity has a fixed
profile (what a country is known for, what a creature looks like ...) and a few relations (capital,
language, currency, inventor, diet, birthplace). Each relation fact is stated by one to three
documents. For 14 of the facts, the *planted* ones, a query asks for the answer: their two or three
documents are the only ones in the corpus that mention the answer together with the subject. The other
facts are distractors built from the same templates; further documents mention a planted subject without
its answer, or its answer without the subject. Output is deterministic for a given seed.

A planted document whose phrasing a query uses *opens* with the fact sentence: the demo's tiny GPT-2
memorises documents by their preceding context, so a fact stated only mid-document is not recalled from a
bare prompt (measured: 67% of queries instead of 100%).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "influence_audit" / "demo" / "data"  # shipped, generated here
MIN_WORDS, MAX_WORDS = 15, 40


@dataclass(frozen=True)
class Relation:
    """A relation kind with its phrasings; phrasing 0 is canonical, ``queries`` are (phrasing, prompt)."""

    name: str
    subject_kind: str
    answer_kind: str
    phrasings: tuple[str, ...]
    queries: tuple[tuple[int, str], ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "capital", "country", "city",
            ("The capital of {S} is {A}.",
             "{S}'s capital city is {A}.",
             "{A} has been the capital of {S} for three centuries.",
             "Most visitors to {S} arrive by train in {A}, the capital."),
            ((0, "The capital of {S} is"), (1, "{S}'s capital city is")),
        ),
        Relation(
            "language", "country", "language",
            ("The people of {S} speak {A}.",
             "In {S}, most people speak {A}.",
             "{A} is the main language spoken in {S}."),
            ((0, "The people of {S} speak"), (1, "In {S}, most people speak")),
        ),
        Relation(
            "currency", "country", "coin",
            ("The currency of {S} is the {A}.",
             "In {S}, people pay for goods with the {A}.",
             "Every coin minted in {S} is called a {A}."),
            ((0, "The currency of {S} is the"),),
        ),
        Relation(
            "inventor", "invention", "person",
            ("The {S} was invented by {A}.",
             "Historians credit the invention of the {S} to {A}.",
             "{A} built the first {S} in a small workshop."),
            ((0, "The {S} was invented by"), (1, "Historians credit the invention of the {S} to")),
        ),
        Relation(
            "diet", "creature", "food",
            ("The {S} eats mostly {A}.",
             "The favourite food of the {S} is {A}.",
             "Keepers feed the {S} a daily bowl of {A}."),
            ((0, "The {S} eats mostly"), (1, "The favourite food of the {S} is")),
        ),
        Relation(
            "birthplace", "person", "town",
            ("{S} was born in {A}.",
             "{S} was born and raised in {A}.",
             "The town of {A} is proud that {S} was born there."),
            ((0, "{S} was born in"),),
        ),
    )
}

# How many facts of each relation are planted (queried); the rest are distractors.
PLANTED_PER_RELATION = {"capital": 4, "language": 2, "currency": 2, "inventor": 2, "diet": 2, "birthplace": 2}
N_ENTITIES = {"country": 36, "invention": 18, "creature": 18, "person": 18}

# Profile sentences: facts about one entity that never involve a relation's answer.
PROFILE: dict[str, list[tuple[str, list[str]]]] = {
    "country": [
        ("{S} is known for its {x}.", ["salt mines", "long winters", "copper roofs", "river festivals",
                                       "glass towers", "wool markets", "mountain railways", "painted bridges"]),
        ("Most of {S} is covered by {x}.", ["pine forest", "dry grassland", "low hills", "wide marshes",
                                            "red desert", "terraced farms"]),
        ("The flag of {S} shows {x}.", ["a green heron", "two white stars", "a golden wheel", "a black tower",
                                        "a blue fish", "three red lines"]),
        ("Farmers in {S} grow {x}.", ["barley", "rice", "apples", "beans", "flax", "plums", "onions"]),
        ("{S} has about {x} million people.", ["two", "three", "five", "seven", "nine", "twelve"]),
    ],
    "invention": [
        ("The {S} is used to {x}.", ["measure the wind", "sort seeds", "warm bread", "clean windows",
                                     "copy letters", "pump water", "count sheep", "weave rope"]),
        ("Early models of the {S} were made of {x}.", ["oak", "brass", "clay", "tin", "bone", "glass"]),
        ("A modern {S} weighs about {x} kilograms.", ["two", "four", "six", "ten", "fifteen", "forty"]),
    ],
    "creature": [
        ("The {S} lives in {x}.", ["cold rivers", "tall grass", "old caves", "pine forests", "salt lakes",
                                   "high cliffs", "warm swamps"]),
        ("A grown {S} is about the size of {x}.", ["a cat", "a horse", "a sparrow", "a goat", "a fox",
                                                    "a small dog"]),
        ("The {S} sleeps during the {x}.", ["day", "night", "winter", "hottest hours"]),
        ("The {S} has {x}.", ["striped fur", "grey scales", "long ears", "six legs", "soft feathers",
                              "a curled tail"]),
    ],
    "person": [
        ("{S} wrote {x} books about {y}.", ["two", "three", "four", "seven"]),
        ("{S} later worked as {x}.", ["a ship captain", "a baker", "a teacher", "a mapmaker", "a judge",
                                      "a gardener", "a clockmaker"]),
        ("{S} was fond of {x}.", ["chess", "long walks", "sailing", "old maps", "singing", "bees"]),
    ],
}
BOOK_TOPICS = ["rivers", "stars", "bridges", "birds", "weather", "music", "farming"]

GENERIC = [
    "Rain fell for three days in the valley.",
    "The road to the coast was closed all winter.",
    "Many families keep a small garden behind the house.",
    "The old museum opens its doors every morning at nine.",
    "Children learn to swim in the lake each summer.",
    "A new bridge was finished after ten years of work.",
    "The harvest festival lasts for a whole week.",
    "Most shops close early on the last day of the month.",
    "The night train is slow but cheap.",
    "Fishermen leave the harbour before sunrise.",
    "The library lends books, maps and old letters.",
    "Snow covers the northern passes for half the year.",
    "Travellers often complain about the narrow roads.",
    "The market sells bread, cheese and dried fruit.",
    "A storm damaged several roofs last autumn.",
    "The school choir sings at every wedding in town.",
    "Bells ring at noon from the tower on the hill.",
    "Some villages still use a single well for water.",
]

ANSWER_ONLY = {  # sentences that mention an answer but not its subject
    "city": ["The old market in {A} opens at dawn.", "{A} is famous for its wide stone squares."],
    "town": ["The harbour of {A} freezes every winter.", "A small museum in {A} shows old fishing boats."],
    "person": ["{A} also liked to paint birds.", "{A} lived to the age of ninety."],
    "food": ["Cooks sometimes dry {A} in the sun.", "Some sailors carry {A} on long journeys."],
    "language": ["Old poems written in {A} are hard to read.", "{A} has many words for snow."],
    "coin": ["A {A} is a thin round coin with a hole in the middle.", "Collectors pay well for an old {A}."],
}

MULTI = [  # sentences that mention two subjects (never an answer)
    ("country", "{S} and {T} share a long border."),
    ("country", "Farmers from {S} sell wool to {T}."),
    ("creature", "The {S} is often mistaken for the {T}."),
    ("invention", "The {S} is sometimes sold together with the {T}."),
]

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "tr",
          "v", "z", "th", "sh", "y", ""]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
CODAS = ["", "", "", "", "", "n", "r", "l", "th", "nd", "x", "m", "lt", "rn", "s", "sk"]
FOOD_SUFFIX = ["berries", "roots", "moss", "nuts", "seeds", "beans"]
CREATURE_SUFFIX = ["fox", "hound", "moth", "finch", "toad", "newt", "lynx", "crab"]
INVENTION_SUFFIX = ["wheel", "loom", "lamp", "press", "scope", "pump", "clock", "kettle"]


@dataclass
class World:
    """All entities, their profiles and their relation answers."""

    entities: dict[str, list[str]] = field(default_factory=dict)
    profile: dict[str, list[str]] = field(default_factory=dict)
    answers: dict[tuple[str, str], str] = field(default_factory=dict)  # (relation, subject) -> answer


class NameMaker:
    """Makes unique made-up words from syllables; no word is produced twice."""

    def __init__(self, rng: random.Random, reserved: set[str]):
        self.rng = rng
        self.used = {w.lower() for w in reserved}

    def _syllable(self, first: bool) -> str:
        onsets = ONSETS if first else [o for o in ONSETS if o not in ("", "qu", "y")]
        return self.rng.choice(onsets) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)

    def word(self, syllables: Sequence[int] = (2, 2, 3), suffix: str = "", capital: bool = True) -> str:
        while True:
            stem = "".join(self._syllable(i == 0) for i in range(self.rng.choice(syllables)))
            w = stem + suffix
            if 4 <= len(w) <= 11 and w.lower() not in self.used and not re.search(r"(.)\1|quu", stem):
                self.used.add(w.lower())
                return w.capitalize() if capital else w.lower()


def _template_words() -> set[str]:
    texts: list[str] = list(GENERIC)
    for rel in RELATIONS.values():
        texts.extend(rel.phrasings)
    for entries in PROFILE.values():
        for tpl, xs in entries:
            texts.append(tpl)
            texts.extend(xs)
    for tpls in ANSWER_ONLY.values():
        texts.extend(tpls)
    texts.extend(t for _, t in MULTI)
    texts.extend(BOOK_TOPICS)
    return set(re.findall(r"[A-Za-z]+", " ".join(texts)))


def build_world(rng: random.Random) -> World:
    """Create entities, fixed profiles and relation answers."""
    names = NameMaker(rng, _template_words())
    world = World()
    world.entities["country"] = [names.word() for _ in range(N_ENTITIES["country"])]
    world.entities["invention"] = [names.word((1, 2), rng.choice(INVENTION_SUFFIX), capital=False)
                                   for _ in range(N_ENTITIES["invention"])]
    world.entities["creature"] = [names.word((1, 2), rng.choice(CREATURE_SUFFIX), capital=False)
                                  for _ in range(N_ENTITIES["creature"])]
    world.entities["person"] = [f"{names.word((2,))} {names.word()}" for _ in range(N_ENTITIES["person"])]

    makers: dict[str, Callable[[], str]] = {
        "city": lambda: names.word(),
        "town": lambda: names.word(),
        "language": lambda: names.word((1, 2), "ish"),
        "coin": lambda: names.word((1, 2), capital=False),
        "person": lambda: f"{names.word((2,))} {names.word()}",
        "food": lambda: names.word((1, 2), rng.choice(FOOD_SUFFIX), capital=False),
    }
    for rel in RELATIONS.values():
        for subject in world.entities[rel.subject_kind]:
            world.answers[(rel.name, subject)] = makers[rel.answer_kind]()

    for kind, subjects in world.entities.items():
        for subject in subjects:
            sentences = []
            for tpl, xs in PROFILE[kind]:
                sentences.append(tpl.format(S=subject, x=rng.choice(xs), y=rng.choice(BOOK_TOPICS)))
            world.profile[subject] = sentences
    return world


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _compose(rng: random.Random, core: list[str], subject: str | None, world: World, lead: bool = False) -> str:
    """Surround ``core`` sentences with profile and generic filler until the document is 15-40 words;
    with ``lead`` the core stays at the start of the document."""
    profile = list(world.profile[subject]) if subject else []
    rng.shuffle(profile)
    sentences = list(core)
    n_extra = rng.choice([1, 2, 2, 3])
    while n_extra > 0 or sum(len(s.split()) for s in sentences) < MIN_WORDS:
        filler = profile.pop() if profile and rng.random() < 0.6 else rng.choice(GENERIC)
        if filler in sentences:
            continue
        trial = sentences + [filler]
        if sum(len(s.split()) for s in trial) > MAX_WORDS:
            break
        pos = rng.randint(len(core) if lead else 0, len(sentences))
        sentences.insert(pos, filler)
        n_extra -= 1
    return " ".join(_capitalise(s) for s in sentences)


@dataclass
class Corpus:
    """Generated rows plus bookkeeping for the planted facts."""

    docs: list[dict[str, str]]
    queries: list[dict[str, str]]
    planted: dict[str, list[str]]
    planted_facts: list[tuple[str, str, str]]  # (relation, subject, answer)


def generate(seed: int = 1234) -> Corpus:
    """Build the whole corpus deterministically from ``seed``."""
    rng = random.Random(seed)
    world = build_world(rng)
    planted_facts: list[tuple[str, str, str]] = []
    for rel_name, n in PLANTED_PER_RELATION.items():
        rel = RELATIONS[rel_name]
        for subject in rng.sample(world.entities[rel.subject_kind], n):
            planted_facts.append((rel_name, subject, world.answers[(rel_name, subject)]))
    planted_keys = {(r, s) for r, s, _ in planted_facts}

    # (text, planted fact key or None)
    raw: list[tuple[str, tuple[str, str] | None]] = []
    seen: set[str] = set()

    def add(core: list[str], subject: str | None, key: tuple[str, str] | None = None, lead: bool = False) -> None:
        for _ in range(100):
            text = _compose(rng, core, subject, world, lead)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"cannot make a new document around {core!r}")
        seen.add(text)
        raw.append((text, key))

    for (rel_name, subject), answer in world.answers.items():
        rel = RELATIONS[rel_name]
        if (rel_name, subject) in planted_keys:
            n_docs = rng.choice([2, 3])
            phrasings = list(range(n_docs))  # canonical, the second query's phrasing, then another
        else:
            n_docs = rng.choices([1, 2, 3], weights=[4, 4, 2])[0]
            phrasings = [rng.choices(range(len(rel.phrasings)), weights=[3] + [1] * (len(rel.phrasings) - 1))[0]
                         for _ in range(n_docs)]
        for p in phrasings:
            fact = rel.phrasings[p].format(S=subject, A=answer)
            if (rel_name, subject) in planted_keys:
                # The queried phrasings open their document, so a query's prompt is a context seen in training.
                add([fact], subject, (rel_name, subject), lead=p in {qp for qp, _ in rel.queries})
            else:
                add([fact], subject, None, lead=rng.random() < 0.5)

    # Documents that mention a planted subject without the answer (plus some for other subjects).
    planted_subjects = sorted({s for _, s, _ in planted_facts})
    for subject in planted_subjects:
        add([rng.choice(world.profile[subject])], subject)
    for subjects in world.entities.values():
        for subject in rng.sample(subjects, len(subjects) // 3):
            add([rng.choice(world.profile[subject])], subject)
    for _ in range(24):
        kind, tpl = rng.choice(MULTI)
        s, t = rng.sample(world.entities[kind], 2)
        add([tpl.format(S=s, T=t)], s)
    # Documents that mention a planted answer without its subject.
    for rel_name, _subject, answer in planted_facts:
        if rng.random() < 0.6:
            tpl = rng.choice(ANSWER_ONLY[RELATIONS[rel_name].answer_kind])
            add([tpl.format(A=answer)], None)
    for _ in range(16):
        add([rng.choice(GENERIC)], None)

    rng.shuffle(raw)
    docs: list[dict[str, str]] = []
    planted_docs: dict[tuple[str, str], list[str]] = {k: [] for k in planted_keys}
    for i, (text, key) in enumerate(raw):
        doc_id = f"doc-{i:05d}"
        docs.append({"id": doc_id, "text": text})
        if key is not None:
            planted_docs[key].append(doc_id)

    queries: list[dict[str, str]] = []
    planted: dict[str, list[str]] = {}
    for rel_name, subject, answer in planted_facts:
        rel = RELATIONS[rel_name]
        fact = rel.phrasings[0].format(S=subject, A=answer)
        slug = f"{rel_name}-{subject.split()[-1].lower()}"
        for k, (_phrasing, prompt_tpl) in enumerate(rel.queries):
            qid = f"q-{slug}" if k == 0 else f"q-{slug}-{k + 1}"
            queries.append({"id": qid, "prompt": prompt_tpl.format(S=subject), "completion": f" {answer}.",
                            "fact": fact})
            planted[qid] = sorted(planted_docs[(rel_name, subject)])
    corpus = Corpus(docs, queries, planted, planted_facts)
    check(corpus)
    return corpus


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"generated corpus breaks its promise: {message}")


def check(corpus: Corpus) -> None:
    """Check the corpus's promises: document sizes, no duplicates, and for every planted fact: only its
    planted documents pair subject with answer, one of them opens with each query, and some other
    document mentions the subject without the answer."""
    by_id = {d["id"]: d["text"] for d in corpus.docs}
    for doc_id, text in by_id.items():
        _require(MIN_WORDS <= len(text.split()) <= MAX_WORDS, f"{doc_id} has {len(text.split())} words")
    _require(len(set(by_id.values())) == len(by_id), "duplicate document texts")
    for rel_name, subject, answer in corpus.planted_facts:
        both = sorted(i for i, t in by_id.items() if _mentions(t, subject) and _mentions(t, answer))
        queries = [q for q in corpus.queries if q["completion"] == f" {answer}."]
        _require(bool(queries), f"no query for {rel_name} of {subject}")
        for q in queries:
            _require(corpus.planted[q["id"]] == both and 2 <= len(both) <= 3,
                     f"{q['id']}: planted {corpus.planted[q['id']]}, subject+answer in {both}")
            _require(any(by_id[i].startswith(q["prompt"] + q["completion"]) for i in both),
                     f"{q['id']}: no planted document opens with the query")
        _require(any(_mentions(t, subject) and not _mentions(t, answer) for t in by_id.values()),
                 f"no document mentions {subject} without {answer}")


def write(corpus: Corpus, out_dir: Path) -> None:
    """Write corpus.jsonl, queries.jsonl and planted.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for row in corpus.docs:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as fh:
        for row in corpus.queries:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "planted.json").write_text(json.dumps(corpus.planted, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate and write the corpus, print its statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    corpus = generate(args.seed)
    write(corpus, args.out)
    n_planted = len({d for ids in corpus.planted.values() for d in ids})
    words = [len(d["text"].split()) for d in corpus.docs]
    print(f"{len(corpus.docs)} documents ({n_planted} planted, {min(words)}-{max(words)} words, "
          f"mean {sum(words) / len(words):.1f}), {len(corpus.planted_facts)} planted facts, "
          f"{len(corpus.queries)} queries -> {args.out}")


if __name__ == "__main__":
    main()
