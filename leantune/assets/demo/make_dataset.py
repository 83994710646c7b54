"""Write the demo dataset: short questions answered as one-line JSON, {"answer": "<sentence>", "topic": ...}.

SmolLM2-135M-Instruct answers in prose, often a rambling paragraph; after a few minutes of LoRA it
answers `{"answer": "The capital of France is Paris.", "topic": "geography"}`. The change is visible
at a glance and checkable by a program (json.loads, the two keys, the topic from a closed set).

Why the answer is a sentence, not a bare "Paris": measured on the 20 held-out questions, a bare-answer
format lost facts the base knows (right answer anywhere in the reply: 20/20 before, 14/20 after at
lr 1e-3 with sums in the data, 12/20 at 5e-4 without; "legs of a cat" -> "20"; with sentences 17/20):
the 135M model recalls a fact best inside the sentence it would say anyway. For the same reason there is no arithmetic: the base adds badly
("10 + 5 = 6"), and teaching it sums it cannot do teaches it to make numbers up.

Every fact below is common knowledge written out by us (Apache-2.0). The output is deterministic:
run `python leantune/assets/demo/make_dataset.py` and git shows no diff. The held-out questions
(prompts.json) share no subject with the training set; `check()` makes sure.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = ("geography", "math", "science", "language", "animals", "colors", "culture")

CAPITALS = {
    "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon", "China": "Beijing",
    "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Nigeria": "Abuja", "Turkey": "Ankara", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "the United Kingdom": "London", "Belgium": "Brussels", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Iran": "Tehran", "Saudi Arabia": "Riyadh",
    "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "New Zealand": "Wellington",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Ukraine": "Kyiv", "Romania": "Bucharest",
}
CAPITAL_Q = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}.",
             "What's the capital city of {}?", "Tell me the capital of {}."]

GEOGRAPHY = [
    ("How many continents are there?", "There are 7 continents."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
    ("What is the tallest mountain on Earth?", "The tallest mountain on Earth is Mount Everest."),
    ("What is the longest river in Africa?", "The longest river in Africa is the Nile."),
    ("What is the largest desert in Africa?", "The largest desert in Africa is the Sahara."),
    ("On which continent is Egypt?", "Egypt is in Africa."),
    ("On which continent is Argentina?", "Argentina is in South America."),
    ("What language is mostly spoken in Brazil?", "Most people in Brazil speak Portuguese."),
    ("What language is mostly spoken in Mexico?", "Most people in Mexico speak Spanish."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound sterling."),
    ("Which country has the largest area?", "Russia is the country with the largest area."),
]

SCIENCE = [
    ("What planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Jupiter."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What star is closest to Earth?", "The star closest to Earth is the Sun."),
    ("What gas do plants take in to make food?", "Plants take in carbon dioxide to make food."),
    ("What gas do people need to breathe?", "People need oxygen to breathe."),
    ("At what temperature in Celsius does water boil at sea level?", "At sea level water boils at 100 °C."),
    ("At what temperature in Celsius does water freeze?", "Water freezes at 0 °C."),
    ("What is the freezing point of water in Fahrenheit?", "The freezing point of water is 32 °F."),
    ("What is H2O better known as?", "H2O is better known as water."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na."),
    ("What is the chemical symbol for silver?", "The chemical symbol for silver is Ag."),
    ("What is the chemical symbol for helium?", "The chemical symbol for helium is He."),
    ("What force pulls objects toward the ground?", "Gravity pulls objects toward the ground."),
    ("What is the hardest natural material?", "The hardest natural material is diamond."),
    ("What is the center of an atom called?", "The center of an atom is called the nucleus."),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What do we call animals that eat only plants?", "Animals that eat only plants are called herbivores."),
    ("What is Earth's only natural satellite?", "Earth's only natural satellite is the Moon."),
]

MATH_FACTS = [
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("How many sides does a pentagon have?", "A pentagon has 5 sides."),
    ("How many sides does an octagon have?", "An octagon has 8 sides."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is half of 50?", "Half of 50 is 25."),
    ("How many degrees are in a right angle?", "A right angle has 90 degrees."),
    ("How many centimetres are in a metre?", "There are 100 centimetres in a metre."),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many months are in a year?", "There are 12 months in a year."),
]

OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("wet", "dry"), ("loud", "quiet"),
             ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("push", "pull"), ("win", "lose"),
             ("left", "right"), ("day", "night"), ("true", "false"), ("first", "last"), ("buy", "sell"),
             ("inside", "outside"), ("above", "below"), ("clean", "dirty"), ("heavy", "light"), ("love", "hate")]
OPPOSITE_Q = ["What is the opposite of {}?", "Give the opposite of \"{}\".", "What's the antonym of {}?"]

PLURALS = [("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"),
           ("man", "men"), ("woman", "women"), ("person", "people"), ("sheep", "sheep"), ("leaf", "leaves"),
           ("knife", "knives"), ("box", "boxes"), ("city", "cities")]
PAST = [("go", "went"), ("eat", "ate"), ("run", "ran"), ("see", "saw"), ("write", "wrote"), ("swim", "swam"),
        ("buy", "bought"), ("think", "thought"), ("take", "took"), ("sing", "sang"), ("fly", "flew"),
        ("drink", "drank"), ("bring", "brought")]

YOUNG = [("cat", "a kitten"), ("dog", "a puppy"), ("cow", "a calf"), ("sheep", "a lamb"), ("horse", "a foal"),
         ("frog", "a tadpole"), ("bear", "a cub"), ("duck", "a duckling"), ("kangaroo", "a joey"),
         ("swan", "a cygnet"), ("goat", "a kid")]
ANIMALS = [
    ("How many legs does an insect have?", "An insect has 6 legs."),
    ("How many legs does a bird have?", "A bird has 2 legs."),
    ("What is the largest mammal?", "The largest mammal is the blue whale."),
    ("Which big cat is the quickest runner on land?", "The cheetah is the quickest runner on land."),
    ("What do bees make?", "Bees make honey."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What do cows drink?", "Cows drink water."),
    ("Which bird is a symbol of peace?", "The dove is a symbol of peace."),
    ("What is the tallest animal?", "The tallest animal is the giraffe."),
    ("Which animal has a trunk?", "The elephant has a trunk."),
    ("How many arms does an octopus have?", "An octopus has 8 arms."),
]

COLORS = [("the sky on a clear day", "blue"), ("grass", "green"), ("a banana", "yellow"), ("snow", "white"),
          ("coal", "black"), ("an orange", "orange"), ("a lemon", "yellow"), ("milk", "white"),
          ("a crow", "black"), ("a pumpkin", "orange"), ("a strawberry", "red"), ("chocolate", "brown"),
          ("an emerald", "green"), ("a sapphire", "blue"), ("a lime", "green"), ("a polar bear's fur", "white")]
COLOR_Q = ["What color is {}?", "What colour is {}?", "Which color is {}?"]

CULTURE = [
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon."),
    ("How many players are on a soccer team on the field?", "A soccer team has 11 players on the field."),
    ("How many strings does a violin have?", "A violin has 4 strings."),
    ("How many keys does a standard piano have?", "A standard piano has 88 keys."),
    ("In which city is the Colosseum?", "The Colosseum is in Rome."),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("How many colors are in a rainbow?", "A rainbow has 7 colors."),
    ("Which sport uses a bat and wickets?", "Cricket uses a bat and wickets."),
]

# The held-out questions: facts SmolLM2-135M-Instruct already states correctly in prose (checked by asking it),
# so the gain the demo measures is the format the data teaches, not knowledge. `subject` is the part of
# the question that no training question may contain (check()). "show": printed as an example.
# Left out on purpose: sums beyond 2 + 2 (the base adds badly, "10 + 5 = 6"), and capitals it gets
# wrong (Italy, Spain, Portugal).
HELD_OUT = [
    {"prompt": "What is the capital of France?", "answers": ["Paris"], "topic": "geography", "subject": "france", "show": True},
    {"prompt": "What is the capital of Japan?", "answers": ["Tokyo"], "topic": "geography", "subject": "capital of japan"},
    {"prompt": "What is the capital of Russia?", "answers": ["Moscow"], "topic": "geography", "subject": "capital of russia"},
    {"prompt": "What is the capital of Greece?", "answers": ["Athens"], "topic": "geography", "subject": "capital of greece"},
    {"prompt": "What is the capital of Poland?", "answers": ["Warsaw", "Warszawa"], "topic": "geography", "subject": "capital of poland"},
    {"prompt": "What is the capital of Norway?", "answers": ["Oslo"], "topic": "geography", "subject": "capital of norway"},
    {"prompt": "What is the capital of Kenya?", "answers": ["Nairobi"], "topic": "geography", "subject": "capital of kenya"},
    {"prompt": "What is the capital of Austria?", "answers": ["Vienna"], "topic": "geography", "subject": "capital of austria"},
    {"prompt": "What is the opposite of fast?", "answers": ["slow"], "topic": "language", "subject": "fast", "show": True},
    {"prompt": "What is the opposite of yes?", "answers": ["no"], "topic": "language", "subject": "opposite of yes"},
    {"prompt": "What is the opposite of black?", "answers": ["white"], "topic": "language", "subject": "opposite of black"},
    {"prompt": "What is the plural of cat?", "answers": ["cats"], "topic": "language", "subject": "plural of cat"},
    {"prompt": "What is the plural of dog?", "answers": ["dogs"], "topic": "language", "subject": "plural of dog", "show": True},
    {"prompt": "What is the past tense of walk?", "answers": ["walked"], "topic": "language", "subject": "tense of walk", "show": True},
    {"prompt": "How many days are in a week?", "answers": ["7 days", "seven days"], "topic": "math", "subject": "days are in a week"},
    {"prompt": "How many seconds are in a minute?", "answers": ["60 seconds", "sixty seconds"], "topic": "math", "subject": "seconds are in a minute"},
    {"prompt": "What is 2 + 2?", "answers": ["4", "four"], "topic": "math", "subject": "2 + 2"},
    {"prompt": "How many legs does a cat have?", "answers": ["4 legs", "four legs"], "topic": "animals", "subject": "legs does a cat", "show": True},
    {"prompt": "How many legs does a dog have?", "answers": ["4 legs", "four legs"], "topic": "animals", "subject": "legs does a dog"},
    {"prompt": "What is the chemical symbol for oxygen?", "answers": ["O"], "topic": "science", "subject": "symbol for oxygen"},
]


def examples() -> list[tuple[str, str, str]]:
    """(question, answer, topic) triples, in a fixed order before shuffling."""
    rng = random.Random(0)
    rows: list[tuple[str, str, str]] = []
    rows += [(rng.choice(CAPITAL_Q).format(c), f"The capital of {c} is {city}.", "geography")
             for c, city in CAPITALS.items()]
    rows += [(q, a, "geography") for q, a in GEOGRAPHY]
    rows += [(q, a, "math") for q, a in MATH_FACTS]
    rows += [(q, a, "science") for q, a in SCIENCE]
    rows += [(rng.choice(OPPOSITE_Q).format(w), f"The opposite of {w} is {o}.", "language") for w, o in OPPOSITES]
    rows += [(f"What is the plural of {w}?", f"The plural of {w} is {p}.", "language") for w, p in PLURALS]
    rows += [(f"What is the past tense of {w}?", f"The past tense of {w} is {p}.", "language") for w, p in PAST]
    rows += [(f"What is a baby {animal} called?", f"A baby {animal} is called {young}.", "animals")
             for animal, young in YOUNG]
    rows += [(q, a, "animals") for q, a in ANIMALS]
    rows += [(rng.choice(COLOR_Q).format(thing), f"{thing[0].upper() + thing[1:]} is {c}.", "colors") for thing, c in COLORS]
    rows += [(q, a, "culture") for q, a in CULTURE]
    return rows


def as_record(question: str, answer: str, topic: str) -> dict:
    reply = json.dumps({"answer": answer, "topic": topic}, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def check(rows: list[tuple[str, str, str]]) -> None:
    questions = [q for q, _, _ in rows]
    for q, a, _ in rows:
        assert a.endswith(".") and a[0].isupper(), f"the answer to {q!r} is not one sentence: {a!r}"
    assert len(set(questions)) == len(questions), "duplicate questions"
    assert all(t in TOPICS for _, _, t in rows)
    for q in questions:
        leaked = [h["subject"] for h in HELD_OUT if h["subject"] in q.lower()]
        assert not leaked, f"held-out subject {leaked} leaked into training: {q}"
    assert {h["topic"] for h in HELD_OUT} <= set(TOPICS)


def render() -> tuple[str, str]:
    """The text of train.jsonl and prompts.json."""
    rows = examples()
    check(rows)
    random.Random(1).shuffle(rows)
    train = "".join(json.dumps(as_record(*r), ensure_ascii=False) + "\n" for r in rows)
    questions = [{k: v for k, v in h.items() if k != "subject"} for h in HELD_OUT]
    return train, json.dumps({"topics": TOPICS, "questions": questions}, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    train, prompts = render()
    (HERE / "train.jsonl").write_text(train, encoding="utf-8")
    (HERE / "prompts.json").write_text(prompts, encoding="utf-8")
    print(f"wrote {train.count(chr(10))} training examples and {len(HELD_OUT)} held-out prompts to {HERE}")


if __name__ == "__main__":
    main()
