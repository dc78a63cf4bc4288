"""Real news-like photos that ship inside installed wheels, with entity captions.

scikit-image, matplotlib and scikit-learn carry a few real photographs; the demo
uses them as entity queries next to the synthetic dataset, so the LLM explains
real captions about real entities.
"""
import os

# (id, package, file, caption, headline, section, a hand-written explanation)
PHOTOS = [
    ("astronaut", "skimage", "astronaut.png",
     "Astronaut Eileen Collins poses in her NASA flight suit before a Space Shuttle mission",
     "First woman to command a Space Shuttle", "science",
     "Eileen Collins is a NASA astronaut, the first woman to pilot and command a Space Shuttle; "
     "she is shown smiling in an orange flight suit in front of an American flag."),
    ("dscovr_launch", "skimage", "rocket.jpg",
     "A SpaceX Falcon 9 rocket lifts off from Cape Canaveral carrying NOAA's DSCOVR satellite",
     "Deep-space weather satellite launched", "science",
     "Falcon 9 is SpaceX's tall white two-stage rocket; DSCOVR is a NOAA satellite watching the solar "
     "wind. The launch shows a bright exhaust plume and smoke at the pad on the Florida coast."),
    ("pompeii_coins", "skimage", "coins.png",
     "Greek coins from Pompeii are displayed at the Naples archaeological museum",
     "Ancient coins from Pompeii on show", "arts",
     "Pompeii is the Roman city buried by Vesuvius; its Greek coins are small round metal discs "
     "stamped with heads and symbols, laid out in rows in a grey photograph."),
    ("grace_hopper", "matplotlib", "grace_hopper.jpg",
     "Rear Admiral Grace Hopper, the pioneer of computer programming, in her US Navy uniform",
     "Computing pioneer honoured by the Navy", "science",
     "Grace Hopper was a US Navy rear admiral and computer scientist who created the first compiler; "
     "she is pictured in a dark navy uniform with medals and a white cap badge."),
    ("summer_palace", "sklearn", "china.jpg",
     "Tourists visit the Tower of Buddhist Incense at Beijing's Summer Palace",
     "Summer Palace draws autumn visitors", "travel",
     "The Tower of Buddhist Incense is an octagonal temple tower with red pillars and green-tiled "
     "roofs on Longevity Hill in the Summer Palace, Beijing, above Kunming Lake."),
    ("dahlia_show", "sklearn", "flower.jpg",
     "An orange dahlia wins first prize at the Chelsea Flower Show",
     "Dahlia takes top prize at Chelsea", "arts",
     "The Chelsea Flower Show is the Royal Horticultural Society's garden show in London; a dahlia "
     "is a round flower of many layered petals, here peach-orange against dark green leaves."),
]


def photo_path(package, filename):
    """Where an installed wheel keeps the photo (ImportError if the package is missing)."""
    if package == "skimage":
        import skimage  # lazy: optional, only its sample photos
        return os.path.join(os.path.dirname(skimage.__file__), "data", filename)  # not a user path: wheel data
    if package == "sklearn":
        import sklearn  # lazy: optional, only its sample photos
        images = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")  # not a user path: wheel data
        return os.path.join(images, filename)  # not a user path: wheel data
    if package == "matplotlib":
        import matplotlib.cbook  # lazy: optional, only its sample photos
        return str(matplotlib.cbook.get_sample_data(filename, asfileobj=False))
    raise ValueError(f"unknown package {package!r}")


def real_photo_records():
    """[{id, image (absolute path), query, headline, label, explanation}] for the photos found."""
    records = []
    for photo_id, package, filename, caption, headline, section, explanation in PHOTOS:
        try:
            path = photo_path(package, filename)
        except ImportError:
            continue
        if os.path.exists(path):  # not a user path: package data inside an installed wheel
            records.append(dict(id=f"photo-{photo_id}", image=path, query=caption, headline=headline,
                                label=section, explanation=explanation))
    return records
