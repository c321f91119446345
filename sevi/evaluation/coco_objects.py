"""The 80 COCO object categories, their synonyms and the word rules of the standard CHAIR metric.

Runtime-side data with no dependencies: the CHAIR scorer (`bench.chair`, through `bench.coco_objects`) and
the server's playground page (which marks object words that differ between captions) both read it, and
server/ must not import bench/.

Restated from the reference CHAIR implementation (Rohrbach et al. 2018, "Object Hallucination in Image
Captioning"): its synonym list maps many surface words to one COCO category, and a few two-word
phrases must be read as one word ("hot dog" is not a dog, "teddy bear" is not a bear, a "baby bird" is
a bird and not a person). The reference reads the synonym file with `split(', ')`; duplicates and the
odd typo ("televison", "phon", "solider") are kept on purpose so that scores match it.
"""

from __future__ import annotations

# One row per category: the category name first, then its synonyms (the reference `synonyms.txt`).
_SYNONYM_ROWS: tuple[str, ...] = (
    "person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, "
    "passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, "
    "traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, "
    "woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, "
    "soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, "
    "camper, driver, solider, hunter, shopper, villager",
    "bicycle, bike, bicycle, bikes, bicycles, unicycle, minibike, trike",
    "car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi",
    "motorcycle, scooter, motor bike, motor cycle, motorbike, scooter, moped",
    "airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane",
    "bus, minibus, trolley",
    "train, locomotive, tramway, caboose",
    "truck, pickup, lorry, hauler, firetruck",
    "boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, "
    "catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, "
    "barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship",
    "traffic light, street light, traffic signal, stop light, streetlight, stoplight",
    "fire hydrant, hydrant",
    "stop sign",
    "parking meter, meter",
    "bench, pew",
    "bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, "
    "hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, "
    "egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, "
    "cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, "
    "cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, "
    "cockatoo, songbird",
    "cat, kitten, feline, tabby",
    "dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, "
    "terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, "
    "corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky",
    "horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco",
    "sheep, lamb, ram, lamb, goat, ewe",
    "cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison",
    "elephant",
    "bear, grizzly",
    "zebra",
    "giraffe",
    "backpack, knapsack",
    "umbrella",
    "handbag, wallet, purse, briefcase",
    "tie, bow, bow tie",
    "suitcase, suit case, luggage",
    "frisbee",
    "skis, ski",
    "snowboard",
    "sports ball, ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard, longboard, skimboard, shortboard, wakeboard",
    "tennis racket, racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife, pocketknife, knives",
    "spoon",
    "bowl, container",
    "banana",
    "apple",
    "sandwich, burger, sub, cheeseburger, hamburger",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut, doughnut, bagel",
    "cake, cheesecake, cupcake, shortcake, coffeecake, pancake",
    "chair, seat, stool",
    "couch, sofa, recliner, futon, loveseat, settee, chesterfield",
    "potted plant, houseplant",
    "bed",
    "dining table, table, desk",
    "toilet, urinal, commode, toilet, lavatory, potty",
    "tv, monitor, televison, television",
    "laptop, computer, notebook, netbook, lenovo, macbook, laptop computer",
    "mouse",
    "remote",
    "keyboard",
    "cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iphone",
    "microwave",
    "oven, stovetop, stove, stove top oven",
    "toaster",
    "sink",
    "refrigerator, fridge, fridge, freezer",
    "book, novel, minibook, paperback, hardcover",
    "clock",
    "vase",
    "scissors",
    "teddy bear, teddybear",
    "hair drier, hairdryer, hair dryer, blow dryer, blowdryer, blow drier, dryer",
    "toothbrush",
)


def _parse_rows(rows: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for row in rows:
        words = [w.strip() for w in row.split(",") if w.strip()]
        table[words[0]] = tuple(dict.fromkeys(words))  # de-duplicate, keep order
    return table


#: category -> (category, synonym, ...), in the official COCO category order.
SYNONYMS: dict[str, tuple[str, ...]] = _parse_rows(_SYNONYM_ROWS)

#: The 80 COCO category names (as in instances_*.json "categories").
CATEGORIES: tuple[str, ...] = tuple(SYNONYMS)

#: surface word or phrase -> COCO category.
WORD_TO_CATEGORY: dict[str, str] = {w: cat for cat, words in SYNONYMS.items() for w in words}

# Two-word phrases the reference reads as one token. The list is the reference's, which also names
# "home plate" and "train track" (not objects; merging them keeps "train" in "train track" from firing).
COCO_DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)

# Qualifiers that would otherwise fire "person" ("baby", "adult", "passenger").
ANIMAL_WORDS: tuple[str, ...] = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")


def _double_word_map() -> dict[str, str]:
    table = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # what a naive singularizer makes of "wine glass"
    return table


#: two-word phrase -> the single word it is read as (itself, or the head noun for qualifier phrases).
DOUBLE_WORD_MAP: dict[str, str] = _double_word_map()


def category_of(word: str) -> str | None:
    """The COCO category that `word` (already singular, lower case) names, or None."""
    return WORD_TO_CATEGORY.get(word)
