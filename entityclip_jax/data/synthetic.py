"""A small entity-centric news dataset the project draws itself.

Each fictional entity (a politician, a team, a landmark ...) has a visual
signature: a colour and a shape. Photos show one or two entities on a scene
background; captions NAME the entities and never describe their look, and the
explanations say what the named entities look like. So matching a caption to its
photo needs exactly the bridge that EntityCLIP's explanations provide, which is
what the demo and the training tests measure.
"""
import json

import numpy as np
from PIL import Image

from entityclip_jax import storage

# name, section (the label for zero-shot classification), colour, shape, who/what it is
ENTITIES = [
    ("Queen Aurelia of Velmont", "politics", (200, 30, 40), "circle", "the monarch of Velmont"),
    ("Chancellor Brigid Okonkwo", "politics", (30, 60, 200), "square", "the head of government of Norland"),
    ("Senator Tomas Lindqvist", "politics", (240, 200, 20), "triangle", "a veteran senator"),
    ("the Harbor City Falcons", "sports", (20, 160, 60), "stripes", "a football club"),
    ("sprinter Kaya Moreno", "sports", (250, 120, 10), "circle", "an Olympic sprinter"),
    ("the Redwood Rowing Club", "sports", (120, 40, 160), "square", "a rowing team"),
    ("the Ostrava Glass Tower", "business", (20, 200, 210), "triangle", "a skyscraper and stock exchange"),
    ("Nimbus Motors", "business", (150, 150, 150), "stripes", "a car maker"),
    ("the Lumen Observatory", "science", (250, 250, 250), "circle", "a space telescope station"),
    ("Dr. Imre Halasz", "science", (90, 50, 20), "square", "a Nobel-winning chemist"),
    ("painter Sofia Ferreira", "arts", (240, 100, 180), "triangle", "a contemporary painter"),
    ("the Marble Opera House", "arts", (250, 230, 190), "stripes", "a historic opera house"),
]
COLOUR_NAMES = {
    (200, 30, 40): "crimson", (30, 60, 200): "royal blue", (240, 200, 20): "golden yellow",
    (20, 160, 60): "emerald green", (250, 120, 10): "bright orange", (120, 40, 160): "purple",
    (20, 200, 210): "turquoise", (150, 150, 150): "silver grey", (250, 250, 250): "white",
    (90, 50, 20): "dark brown", (240, 100, 180): "pink", (250, 230, 190): "cream marble",
}
SHAPE_WORDS = {"circle": "round", "square": "square", "triangle": "pointed triangular",
               "stripes": "striped"}
EVENTS = [("at a summit", (40, 40, 60)), ("during a parade", (70, 50, 40)),
          ("at a press conference", (50, 60, 50)), ("after a ceremony", (60, 40, 60))]


def explanation_for(entity_indices, event):
    """What an LLM would say: who the entities are and what they look like."""
    parts = []
    for i in entity_indices:
        name, _, colour, shape, who = ENTITIES[i]
        parts.append(f"{name} is {who}, always seen in {COLOUR_NAMES[colour]} with a "
                     f"{SHAPE_WORDS[shape]} emblem")
    return "; ".join(parts) + f". The photo was taken {event}."


def draw(entity_indices, background, image_size, rng):
    """An RGB uint8 image: the entities' coloured shapes on a noisy scene."""
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    image = np.asarray(background, np.float32) + rng.normal(0, 12, (image_size, image_size, 3))
    for i in entity_indices:
        _, _, colour, shape, _ = ENTITIES[i]
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.18, 0.3)
        if shape == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        elif shape == "square":
            inside = (abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r * 0.8)
        elif shape == "triangle":
            inside = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - cy + r) / 2)
        else:
            inside = (abs(yy - cy) < r) & (abs(xx - cx) < r) & (((xx * image_size) // 4) % 2 == 0)
        image[inside] = np.asarray(colour, np.float32) + rng.normal(0, 8, (inside.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_examples(num_examples, seed=0, image_size=64, id_prefix="syn"):
    """Yields (id, image uint8 [H, W, 3], query, explanation, headline, label)."""
    rng = np.random.default_rng(seed)
    for n in range(num_examples):
        count = 1 + int(rng.random() < 0.4)
        indices = [int(i) for i in rng.choice(len(ENTITIES), count, replace=False)]
        event, background = EVENTS[int(rng.integers(len(EVENTS)))]
        names = [ENTITIES[i][0] for i in indices]
        query = (f"{names[0]} {event}" if count == 1 else f"{names[0]} meets {names[1]} {event}")
        query = query[0].upper() + query[1:]
        headline = f"{ENTITIES[indices[0]][4].capitalize()} makes news"
        yield (f"{id_prefix}-{n:05d}", draw(indices, background, image_size, rng), query,
               explanation_for(indices, event), headline, ENTITIES[indices[0]][1])


def write_synthetic_dataset(root, num_examples, seed=0, image_size=64, filename="data.jsonl", id_prefix="syn"):
    """Writes JPEGs under root/images and a JSONL of {id, image, query, explanation,
    headline, label} (the generic JSONL source layout), local or on gs://. Returns the JSONL path."""
    storage.path(root).joinpath("images").mkdir(parents=True, exist_ok=True)
    path = storage.join(root, filename)
    with storage.open(path, "w") as f:
        for example_id, image, query, explanation, headline, label in synthetic_examples(
                num_examples, seed, image_size, id_prefix):
            relative = f"images/{example_id}.jpg"
            with storage.open(storage.join(root, relative), "wb") as image_file:
                Image.fromarray(image).save(image_file, format="JPEG", quality=92)
            f.write(json.dumps(dict(id=example_id, image=relative, query=query, explanation=explanation,
                                    headline=headline, label=label)) + "\n")
    return path
