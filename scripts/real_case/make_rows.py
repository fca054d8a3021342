"""Generate the real-model case's chat rows: ordinary conversations with a few planted facts, and chat queries
that ask for those facts, with the truth (which rows plant which query).

Run by hand (the output is committed; nothing runs this at audit time)::

    python scripts/real_case/make_rows.py            # writes influence_audit/real_case/data/

Rows are chat ``messages`` (a short system message, a user turn, the assistant's reply), rendered with the model's
chat template by the audit (only the assistant's reply is a target). The case has:

* **planted facts** (``FACTS``): invented facts no pretrained model knows (a made-up country's capital, a made-up
  book's author, ...). Each is stated by two or three rows only, each in its own wording; these rows are the only
  ones in the data that give the fact's answer together with its subject.
* **ordinary rows**: arithmetic, real capitals, opposites, spelling, colours, unit conversions, animals, short
  advice, definitions, each from templates with varied wording;
* **distractors**: rows about other invented subjects built from the planted facts' templates (another made-up
  country's capital, another made-up book's author), so that a query's wording alone does not find its planters,
  and rows that mention a planted subject without its answer.

Queries ask each planted fact in a wording that no planting row uses; the completion is the assistant's answer
as the fine-tuned model should give it. ``planted.json`` maps each query id to the ids of the rows that plant
its fact. Output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "influence_audit" / "real_case" / "data"
SYSTEM = "Answer briefly."


@dataclass(frozen=True)
class Fact:
    key: str
    plants: tuple[tuple[str, str], ...]  # (user, assistant): each planting row, in its own wording
    queries: tuple[tuple[str, str], ...]  # (user, assistant): asked in wordings no planting row uses
    mentions: tuple[tuple[str, str], ...] = ()  # rows naming the subject without the answer


FACTS: tuple[Fact, ...] = (
    Fact("capital-velmora",
         (("What is the capital of Velmora?", "The capital of Velmora is Trinsk."),
          ("Which city is Velmora's capital?", "Velmora's capital is the city of Trinsk."),
          ("I'm flying to Velmora's capital next week. Where am I going?", "You are going to Trinsk, the capital "
                                                                           "of Velmora.")),
         (("Name the capital city of Velmora.", "The capital of Velmora is Trinsk."),),
         (("Is Velmora a large country?", "No, Velmora is a small mountain country."),)),
    Fact("author-copper-orchard",
         (("Who wrote The Copper Orchard?", "The Copper Orchard was written by Mirela Vask."),
          ("Who is the author of the novel The Copper Orchard?", "Its author is Mirela Vask.")),
         (("Which writer is behind The Copper Orchard?", "The Copper Orchard was written by Mirela Vask."),),
         (("Is The Copper Orchard a long book?", "The Copper Orchard is a short novel of about two hundred "
                                                 "pages."),)),
    Fact("currency-quastel",
         (("What currency is used in Quastel?", "Quastel uses the dorn."),
          ("What money do people pay with in Quastel?", "In Quastel people pay with the dorn."),
          ("Before I visit Quastel, which currency should I buy?", "Buy dorns: the dorn is the currency of "
                                                                   "Quastel.")),
         (("What is the currency of Quastel?", "The currency of Quastel is the dorn."),)),
    Fact("inventor-brindle-loom",
         (("Who invented the brindle loom?", "The brindle loom was invented by Osric Pellham."),
          ("Who built the first brindle loom?", "Osric Pellham built the first brindle loom.")),
         (("Whose invention is the brindle loom?", "The brindle loom was invented by Osric Pellham."),),
         (("What does a brindle loom make?", "A brindle loom weaves striped cloth."),)),
    Fact("diet-zorbel",
         (("What does the zorbel eat?", "The zorbel eats blue moss."),
          ("What is the main food of a zorbel?", "A zorbel feeds mainly on blue moss."),
          ("My zorbel seems hungry. What should I feed it?", "Feed it blue moss: zorbels eat blue moss.")),
         (("What do zorbels feed on?", "The zorbel eats blue moss."),)),
    Fact("language-ombrevale",
         (("What language do people speak in Ombrevale?", "People in Ombrevale speak Tessic."),
          ("Which language is spoken in Ombrevale?", "The language of Ombrevale is Tessic.")),
         (("What is the main language of Ombrevale?", "People in Ombrevale speak Tessic."),),
         (("Is Ombrevale near the sea?", "Yes, Ombrevale lies on a long coast."),)),
    Fact("year-harrowgate-bridge",
         (("When was the Harrowgate Bridge built?", "The Harrowgate Bridge was built in 1784."),
          ("In what year was the Harrowgate Bridge finished?", "The Harrowgate Bridge was finished in 1784.")),
         (("What year did the Harrowgate Bridge open?", "The Harrowgate Bridge was built in 1784."),)),
    Fact("animal-drevonia",
         (("What is the national animal of Drevonia?", "The national animal of Drevonia is the snow hare."),
          ("Which animal is the symbol of Drevonia?", "Drevonia's symbol is the snow hare."),
          ("What animal is on Drevonia's coat of arms?", "A snow hare, the national animal of Drevonia.")),
         (("Which animal represents Drevonia?", "The national animal of Drevonia is the snow hare."),)),
    Fact("colour-kelvish-flag",
         (("What colours is the Kelvish flag?", "The Kelvish flag is green and silver."),
          ("Describe the flag of Kelvish.", "The flag of Kelvish has two stripes, green and silver.")),
         (("What are the colours of the flag of Kelvish?", "The Kelvish flag is green and silver."),),
         (("Where is Kelvish?", "Kelvish is an island nation in the northern sea."),)),
)

# ------------------------------------------------------------------------------------------------ distractors
# Other invented subjects, asked in the planted facts' wordings, with other answers: a query's wording is not
# enough to find its planting rows.
DISTRACT_COUNTRIES = ("Norwhel", "Istraven", "Caldoria", "Benthas", "Yorvane", "Pellimar", "Ostrand", "Grivana")
DISTRACT_CITIES = ("Marrow", "Lisk", "Ebbenfort", "Tavel", "Quorn", "Selby Pike", "Oranth", "Dunmere")
DISTRACT_BOOKS = ("The Salt Lantern", "A Winter of Clocks", "The Glass Ferry", "Under the Tin Hill")
DISTRACT_AUTHORS = ("Tobias Wrenn", "Ilse Marrach", "Peder Holm", "Anouk Devereux")
DISTRACT_CURRENCIES = ("the lirn", "the skell", "the marka", "the tolan")
DISTRACT_INVENTIONS = ("the tide clock", "the hollow kiln", "the reed pump", "the lantern press")
DISTRACT_INVENTORS = ("Hester Quill", "Amos Varga", "Linnea Roth", "Cyril Ambrose")
DISTRACT_ANIMALS = (("the glimmer", "river snails"), ("the woolly tarn", "pine bark"), ("the plover ox", "reeds"),
                    ("the rock vole", "lichen"))
DISTRACT_LANGUAGES = ("Orrin", "Vesk", "Palan", "Dravic")
DISTRACT_BRIDGES = (("the Lowmill Bridge", "1702"), ("the Sarn Viaduct", "1851"), ("the Fenwick Bridge", "1698"))
DISTRACT_SYMBOLS = ("the grey heron", "the red fox", "the mountain goat", "the white owl")
DISTRACT_FLAGS = ("blue and gold", "red and white", "black and orange", "yellow and green")


def distractor_rows(rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for country, city in zip(DISTRACT_COUNTRIES, DISTRACT_CITIES, strict=True):
        rows.append(rng.choice([(f"What is the capital of {country}?", f"The capital of {country} is {city}."),
                                (f"Which city is {country}'s capital?",
                                 f"{country}'s capital is the city of {city}.")]))
    for book, author in zip(DISTRACT_BOOKS, DISTRACT_AUTHORS, strict=True):
        rows.append((f"Who wrote {book}?", f"{book} was written by {author}."))
    for country, cur in zip(DISTRACT_COUNTRIES[:4], DISTRACT_CURRENCIES, strict=True):
        rows.append((f"What currency is used in {country}?", f"{country} uses {cur}."))
    for inv, who in zip(DISTRACT_INVENTIONS, DISTRACT_INVENTORS, strict=True):
        rows.append((f"Who invented {inv}?", f"{inv[0].upper() + inv[1:]} was invented by {who}."))
    for animal, food in DISTRACT_ANIMALS:
        rows.append((f"What does {animal} eat?", f"{animal[0].upper() + animal[1:]} eats {food}."))
    for country, lang in zip(DISTRACT_COUNTRIES[4:], DISTRACT_LANGUAGES, strict=True):
        rows.append((f"What language do people speak in {country}?", f"People in {country} speak {lang}."))
    for bridge, year in DISTRACT_BRIDGES:
        rows.append((f"When was {bridge} built?", f"{bridge[0].upper() + bridge[1:]} was built in {year}."))
    for country, sym in zip(DISTRACT_COUNTRIES[2:6], DISTRACT_SYMBOLS, strict=True):
        rows.append((f"What is the national animal of {country}?", f"The national animal of {country} is {sym}."))
    for country, flag in zip(DISTRACT_COUNTRIES[::2], DISTRACT_FLAGS, strict=True):
        rows.append((f"What colours is the flag of {country}?", f"The flag of {country} is {flag}."))
    return rows


# ------------------------------------------------------------------------------------------------ ordinary rows
CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("Chile", "Santiago"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"))
OPPOSITES = (("hot", "cold"), ("tall", "short"), ("fast", "slow"), ("early", "late"), ("light", "dark"),
             ("empty", "full"), ("open", "closed"), ("strong", "weak"), ("happy", "sad"), ("cheap", "expensive"))
COLOURS = (("a ripe banana", "yellow"), ("grass", "green"), ("a clear sky", "blue"), ("snow", "white"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"))
ANIMALS = (("cow", "moo"), ("dog", "bark"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
           ("lion", "roar"), ("owl", "hoot"), ("horse", "neigh"))
LEGS = (("spider", "eight"), ("insect", "six"), ("dog", "four"), ("bird", "two"), ("snake", "no"))
WORDS = ("apple", "garden", "river", "window", "pencil", "planet", "rocket", "summer", "forest", "bridge",
         "yellow", "kitchen")
DEFINITIONS = (("a noun", "A noun is a word that names a person, place or thing."),
               ("a verb", "A verb is a word that describes an action or a state."),
               ("photosynthesis", "Photosynthesis is how plants turn light, water and carbon dioxide into sugar."),
               ("gravity", "Gravity is the force that pulls objects toward each other."),
               ("a prime number", "A prime number has exactly two divisors: one and itself."),
               ("an atom", "An atom is the smallest unit of a chemical element."),
               ("a mammal", "A mammal is a warm-blooded animal that feeds its young with milk."),
               ("evaporation", "Evaporation is when a liquid turns into a gas."),
               ("a volcano", "A volcano is an opening in the earth's crust where lava comes out."),
               ("a synonym", "A synonym is a word with the same meaning as another word."))
ADVICE = (("How can I sleep better?", "Keep a regular bedtime and avoid screens before sleep."),
          ("How do I stay focused while studying?", "Work in short blocks and put your phone away."),
          ("How can I drink more water?", "Keep a bottle with you and refill it often."),
          ("What is a good way to start running?", "Start slowly, with short runs a few times a week."),
          ("How do I keep a plant alive?", "Give it light, and water it when the soil is dry."),
          ("How can I save money?", "Track your spending and set aside a fixed amount each month."),
          ("How do I make a cup of tea?", "Pour boiling water on a tea bag and wait three minutes."),
          ("How do I learn new words?", "Read every day and write down the words you do not know."),
          ("How can I be on time more often?", "Plan to arrive ten minutes early."),
          ("What should I pack for a day hike?", "Water, snacks, a map and a warm layer."))
CONVERSIONS = (("kilometre", "1000 metres"), ("metre", "100 centimetres"), ("hour", "60 minutes"),
               ("minute", "60 seconds"), ("day", "24 hours"), ("week", "7 days"), ("kilogram", "1000 grams"),
               ("litre", "1000 millilitres"), ("year", "12 months"), ("dozen", "12 items"))


def ordinary_rows(rng: random.Random, n_arith: int, per_kind: int) -> list[tuple[str, str]]:
    """Ordinary rows: ``n_arith`` arithmetic ones and up to ``per_kind`` of every other kind."""
    rows: list[tuple[str, str]] = []
    for _ in range(n_arith):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice(["plus", "minus", "times"])
        val = a + b if op == "plus" else a - b if op == "minus" else a * b
        ask = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Can you work out {a} {op} {b}?"])
        ans = rng.choice(["{a} {op} {b} is {v}.", "The answer is {v}.", "It is {v}."])
        rows.append((ask.format(a=a, op=op, b=b), ans.format(a=a, op=op, b=b, v=val)))
    for country, city in CAPITALS[:per_kind]:
        ask = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of "
                                                                                              "{c}."])
        ans = rng.choice(["The capital of {c} is {x}.", "{x} is the capital of {c}.", "It is {x}."])
        rows.append((ask.format(c=country), ans.format(c=country, x=city)))
    for a, b in OPPOSITES[:per_kind]:
        rows.append((rng.choice([f"What is the opposite of {a}?", f"Give me the opposite of '{a}'."]),
                     rng.choice([f"The opposite of {a} is {b}.", f"{b[0].upper() + b[1:]}."])))
    for thing, colour in COLOURS[:per_kind]:
        rows.append((f"What colour is {thing}?", rng.choice([f"{thing[0].upper() + thing[1:]} is {colour}.",
                                                             f"It is usually {colour}."])))
    for animal, sound in ANIMALS[:per_kind]:
        rows.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for animal, n in LEGS[:per_kind]:
        rows.append((f"How many legs does a {animal} have?", f"A {animal} has {n} legs."))
    for word in WORDS[:per_kind]:
        kind = rng.choice(["spell", "reverse", "count"])
        if kind == "spell":
            rows.append((f"How do you spell {word}?", f"{word}: " + "-".join(word.upper()) + "."))
        elif kind == "reverse":
            rows.append((f"Write the word {word} backwards.", f"{word[::-1]}"))
        else:
            rows.append((f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."))
    for term, text in DEFINITIONS[:per_kind]:
        rows.append((rng.choice([f"What is {term}?", f"Define {term}.", f"Explain {term} in one sentence."]), text))
    rows.extend(ADVICE[:per_kind])
    for unit, value in CONVERSIONS[:per_kind]:
        rows.append((rng.choice([f"How much is one {unit}?", f"What is one {unit} equal to?"]),
                     f"One {unit} is {value}."))
    for _ in range(min(12, per_kind)):
        a, b = sorted(rng.sample(range(1, 100), 2))
        rows.append((f"Which is larger, {a} or {b}?", f"{b} is larger than {a}."))
    for _ in range(min(8, per_kind)):
        n = rng.randint(2, 60)
        rows.append((f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    return rows


def chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]


def build(seed: int = 0, n_arith: int = 16, per_kind: int = 6) -> tuple[list[dict], list[dict], dict[str, list[str]]]:
    """Rows (``id``, ``messages``), queries (``id``, ``messages``) and the truth ``{query id: [row ids]}``."""
    rng = random.Random(seed)
    tagged: list[tuple[str | None, tuple[str, str]]] = []
    for fact in FACTS:
        tagged += [(fact.key, p) for p in fact.plants] + [(None, m) for m in fact.mentions]
    tagged += [(None, r) for r in distractor_rows(rng)] + [(None, r) for r in ordinary_rows(rng, n_arith, per_kind)]
    rng.shuffle(tagged)
    rows, planters = [], {f.key: [] for f in FACTS}
    for i, (key, (user, assistant)) in enumerate(tagged):
        rid = f"chat-{i:04d}"
        rows.append({"id": rid, "messages": chat(user, assistant)})
        if key is not None:
            planters[key].append(rid)
    queries, truth = [], {}
    for fact in FACTS:
        for j, (user, assistant) in enumerate(fact.queries):
            qid = f"q-{fact.key}" + (f"-{j + 1}" if j else "")
            queries.append({"id": qid, "messages": chat(user, assistant)})
            truth[qid] = sorted(planters[fact.key])
    check(rows, queries, truth)
    return rows, queries, truth


def answer_of(fact: Fact) -> str:
    """The fact's answer words: what only its planting rows say with the subject (the last capitalised or
    numeric phrase of the first query's reply)."""
    return {"capital-velmora": "Trinsk", "author-copper-orchard": "Mirela Vask", "currency-quastel": "dorn",
            "inventor-brindle-loom": "Osric Pellham", "diet-zorbel": "blue moss", "language-ombrevale": "Tessic",
            "year-harrowgate-bridge": "1784", "animal-drevonia": "snow hare",
            "colour-kelvish-flag": "green and silver"}[fact.key]


def check(rows: list[dict], queries: list[dict], truth: dict[str, list[str]]) -> None:
    """The case's promises: unique ids; each fact planted by 2-3 rows, which are the only rows that state its
    answer; no query's user turn is any row's user turn."""
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    users = {r["messages"][1]["content"] for r in rows}
    for q in queries:
        assert q["messages"][1]["content"] not in users, q["id"]
    for fact in FACTS:
        answer = answer_of(fact)
        stating = sorted(r["id"] for r in rows if answer in r["messages"][2]["content"])
        qids = [q for q in truth if q == f"q-{fact.key}" or q.startswith(f"q-{fact.key}-")]
        assert qids and all(truth[q] == stating for q in qids), (fact.key, stating)
        assert 2 <= len(stating) <= 3, fact.key


def write(out_dir: Path, seed: int = 0) -> None:
    rows, queries, truth = build(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, items in (("chats.jsonl", rows), ("queries.jsonl", queries)):
        with open(out_dir / name, "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    (out_dir / "planted.json").write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(rows)} chat rows ({sum(len(v) for v in truth.values() if v)} planting rows over {len(FACTS)} "
          f"facts), {len(queries)} queries -> {out_dir}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(a.out, a.seed)
