"""A small instruction dataset the project writes itself, with references to score against.

The demo must run on a fresh machine with only PyPI access, so it cannot read Dolly from the
Hub. These records are generated from fact tables (capitals, arithmetic, opposites, plurals,
colours, animal sounds, sorting, upper-casing) with one short reference answer each; a fixed
shuffle splits them into train and eval records that never share an instruction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Greece": "Athens", "Portugal": "Lisbon", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "China": "Beijing", "India": "New Delhi",
    "Russia": "Moscow", "Argentina": "Buenos Aires", "Chile": "Santiago", "Cuba": "Havana",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Hungary": "Budapest", "Mexico": "Mexico City",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "old": "young",
    "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet", "high": "low",
    "long": "short", "thick": "thin", "clean": "dirty", "true": "false",
}
PLURALS = {
    "cat": "cats", "child": "children", "mouse": "mice", "box": "boxes", "city": "cities",
    "man": "men", "foot": "feet", "tooth": "teeth", "leaf": "leaves", "baby": "babies",
    "bus": "buses", "knife": "knives", "person": "people", "goose": "geese", "story": "stories",
}
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "chocolate": "brown", "a flamingo": "pink",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "sheep": "baa", "duck": "quack", "owl": "hoot",
    "horse": "neigh", "pig": "oink", "rooster": "cock-a-doodle-doo", "lion": "roar",
}
SENTENCES = [
    "the cat sat on the mat", "we went to the beach", "she likes green tea", "the train is late",
    "my brother plays chess", "it is raining today", "birds can fly", "the shop opens at nine",
]


def demo_records(seed: int = 0) -> list[dict]:
    """All demo records (instruction / input / output), in a fixed shuffled order."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for country, capital in CAPITALS.items():
        recs.append({"instruction": f"What is the capital of {country}?", "input": "", "output": f"The capital of {country} is {capital}."})
    for a in range(2, 20, 3):
        for b in (3, 7, 12):
            recs.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
    for w, o in OPPOSITES.items():
        recs.append({"instruction": f'What is the opposite of "{w}"?', "input": "", "output": f'The opposite of "{w}" is "{o}".'})
    for w, p in PLURALS.items():
        recs.append({"instruction": f'What is the plural of "{w}"?', "input": "", "output": f'The plural of "{w}" is "{p}".'})
    for thing, colour in COLOURS.items():
        recs.append({"instruction": f"What colour is {thing}?", "input": "", "output": f"{thing[0].upper() + thing[1:]} is {colour}."})
    for animal, sound in SOUNDS.items():
        recs.append({"instruction": f"What sound does a {animal} make?", "input": "", "output": f'A {animal} says "{sound}".'})
    for _ in range(12):
        nums = rng.sample(range(1, 50), 4)
        recs.append({
            "instruction": "Sort these numbers from smallest to largest.",
            "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, sorted(nums))),
        })
    for s in SENTENCES:
        recs.append({"instruction": "Rewrite the sentence in capital letters.", "input": s, "output": s.upper()})
    rng.shuffle(recs)
    return recs


def write_demo_data(out_dir: str | Path, num_eval: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl under out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = demo_records(seed)
    eval_recs, train_recs = recs[:num_eval], recs[num_eval:]
    paths = []
    for name, rows in (("train", train_recs), ("eval", eval_recs)):
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
