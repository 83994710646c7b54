"""Write the demo dataset: short questions answered as one-line JSON, {"answer": ..., "topic": ...}.

SmolLM2-135M-Instruct answers in a sentence of prose ("The capital of France is Paris."); after a
few minutes of LoRA it answers `{"answer": "Paris", "topic": "geography"}`. The change is visible at a
glance and checkable by a machine (json.loads, the two keys, the topic from a closed set).

Every fact below is common knowledge written out by us (Apache-2.0); arithmetic is computed. The
output is deterministic: run `python leantune/assets/demo/make_dataset.py` and git shows no diff.
The held-out prompts (prompts.json) share no subject with the training set; `check()` makes sure.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = ("geography", "math", "science", "language", "animals", "colors", "culture")

CAPITALS = {
    "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing",
    "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Greece": "Athens", "Turkey": "Ankara", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Ireland": "Dublin", "the United Kingdom": "London", "Belgium": "Brussels", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Iran": "Tehran", "Saudi Arabia": "Riyadh",
    "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "New Zealand": "Wellington",
    "the Philippines": "Manila", "Pakistan": "Islamabad", "Ukraine": "Kyiv", "Romania": "Bucharest",
}
CAPITAL_Q = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}.",
             "What's the capital city of {}?", "Tell me the capital of {}."]

GEOGRAPHY = [
    ("How many continents are there?", "7"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("What is the tallest mountain on Earth?", "Mount Everest"),
    ("What is the longest river in Africa?", "the Nile"),
    ("What is the largest desert in Africa?", "the Sahara"),
    ("On which continent is Egypt?", "Africa"),
    ("On which continent is Argentina?", "South America"),
    ("What language is mostly spoken in Brazil?", "Portuguese"),
    ("What language is mostly spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "the yen"),
    ("What is the currency of the United Kingdom?", "the pound sterling"),
    ("Which country has the largest area?", "Russia"),
]

SCIENCE = [
    ("What planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What star is closest to Earth?", "the Sun"),
    ("What gas do plants take in to make food?", "carbon dioxide"),
    ("What gas do people need to breathe?", "oxygen"),
    ("At what temperature in Celsius does water boil at sea level?", "100 °C"),
    ("At what temperature in Celsius does water freeze?", "0 °C"),
    ("What is the freezing point of water in Fahrenheit?", "32 °F"),
    ("What is H2O better known as?", "water"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for helium?", "He"),
    ("What force pulls objects toward the ground?", "gravity"),
    ("What is the hardest natural material?", "diamond"),
    ("What is the center of an atom called?", "the nucleus"),
    ("How many bones are in the adult human body?", "206"),
    ("Which organ pumps blood through the body?", "the heart"),
    ("What do we call animals that eat only plants?", "herbivores"),
    ("What is Earth's only natural satellite?", "the Moon"),
]

MATH_FACTS = [
    ("How many sides does a triangle have?", "3"), ("How many sides does a hexagon have?", "6"),
    ("How many sides does a pentagon have?", "5"), ("How many sides does an octagon have?", "8"),
    ("What is the smallest prime number?", "2"), ("What is the square root of 81?", "9"),
    ("What is half of 50?", "25"), ("How many degrees are in a right angle?", "90"),
    ("How many centimetres are in a metre?", "100"), ("How many grams are in a kilogram?", "1000"),
    ("How many days are in a leap year?", "366"), ("How many minutes are in an hour?", "60"),
    ("How many hours are in a day?", "24"), ("How many months are in a year?", "12"),
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
    ("How many legs does an insect have?", "6"), ("How many legs does a dog have?", "4"),
    ("How many legs does a bird have?", "2"), ("What is the largest mammal?", "the blue whale"),
    ("Which big cat is the quickest runner on land?", "the cheetah"), ("What do bees make?", "honey"),
    ("Which animal is known as the king of the jungle?", "the lion"), ("What do cows drink?", "water"),
    ("Which bird is a symbol of peace?", "the dove"), ("What is the tallest animal?", "the giraffe"),
    ("Which animal has a trunk?", "the elephant"), ("How many arms does an octopus have?", "8"),
]

COLORS = [("the sky on a clear day", "blue"), ("grass", "green"), ("a banana", "yellow"), ("snow", "white"),
          ("coal", "black"), ("an orange", "orange"), ("a lemon", "yellow"), ("milk", "white"),
          ("a crow", "black"), ("a pumpkin", "orange"), ("a strawberry", "red"), ("chocolate", "brown"),
          ("an emerald", "green"), ("a sapphire", "blue"), ("a lime", "green"), ("a polar bear's fur", "white")]
COLOR_Q = ["What color is {}?", "What colour is {}?", "Which color is {}?"]

CULTURE = [
    ("Who wrote Romeo and Juliet?", "William Shakespeare"), ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("How many players are on a soccer team on the field?", "11"), ("How many strings does a violin have?", "4"),
    ("How many keys does a standard piano have?", "88"), ("In which city is the Colosseum?", "Rome"),
    ("In which country are the pyramids of Giza?", "Egypt"), ("What instrument has black and white keys?", "the piano"),
    ("How many colors are in a rainbow?", "7"), ("Which sport uses a bat and wickets?", "cricket"),
]

# The held-out prompts: none of their subjects (France, a square, fast, spider, tomato) appear in training.
# No sum is held out: SmolLM2-135M adds badly ("7 + 8 = 55") before and after, which shows nothing.
HELD_OUT = [
    {"prompt": "What is the capital of France?", "answer": "Paris", "topic": "geography"},
    {"prompt": "How many sides does a square have?", "answer": "4", "topic": "math"},
    {"prompt": "What is the opposite of fast?", "answer": "slow", "topic": "language"},
    {"prompt": "How many legs does a spider have?", "answer": "8", "topic": "animals"},
    {"prompt": "What color is a ripe tomato?", "answer": "red", "topic": "colors"},
]
HELD_OUT_WORDS = ("france", "a square", "fast", "spider", "tomato")


def arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    forms = {
        "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."],
        "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."],
        "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."],
    }
    while len(out) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 60), rng.randint(2, 40))
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.add((rng.choice(forms[op]).format(a=a, b=b), str(value)))
    return sorted(out)


def examples() -> list[tuple[str, str, str]]:
    """(question, answer, topic) triples, in a fixed order before shuffling."""
    rng = random.Random(0)
    rows: list[tuple[str, str, str]] = []
    rows += [(rng.choice(CAPITAL_Q).format(c), city, "geography") for c, city in CAPITALS.items()]
    rows += [(q, a, "geography") for q, a in GEOGRAPHY]
    rows += [(q, a, "math") for q, a in arithmetic(rng, 30) + MATH_FACTS]
    rows += [(q, a, "science") for q, a in SCIENCE]
    rows += [(rng.choice(OPPOSITE_Q).format(w), o, "language") for w, o in OPPOSITES]
    rows += [(f"What is the plural of {w}?", p, "language") for w, p in PLURALS]
    rows += [(f"What is the past tense of {w}?", p, "language") for w, p in PAST]
    rows += [(f"What is a baby {animal} called?", young, "animals") for animal, young in YOUNG]
    rows += [(q, a, "animals") for q, a in ANIMALS]
    rows += [(rng.choice(COLOR_Q).format(thing), c, "colors") for thing, c in COLORS]
    rows += [(q, a, "culture") for q, a in CULTURE]
    return rows


def as_record(question: str, answer: str, topic: str) -> dict:
    reply = json.dumps({"answer": answer, "topic": topic}, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def check(rows: list[tuple[str, str, str]]) -> None:
    questions = [q for q, _, _ in rows]
    assert len(set(questions)) == len(questions), "duplicate questions"
    assert all(t in TOPICS for _, _, t in rows)
    for q in questions:
        assert not any(w in q.lower() for w in HELD_OUT_WORDS), f"held-out subject leaked into training: {q}"
    assert {h["topic"] for h in HELD_OUT} <= set(TOPICS)


def render() -> tuple[str, str]:
    """The text of train.jsonl and prompts.json."""
    rows = examples()
    check(rows)
    random.Random(1).shuffle(rows)
    train = "".join(json.dumps(as_record(*r), ensure_ascii=False) + "\n" for r in rows)
    return train, json.dumps(HELD_OUT, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    train, prompts = render()
    (HERE / "train.jsonl").write_text(train, encoding="utf-8")
    (HERE / "prompts.json").write_text(prompts, encoding="utf-8")
    print(f"wrote {train.count(chr(10))} training examples and {len(HELD_OUT)} held-out prompts to {HERE}")


if __name__ == "__main__":
    main()
