"""Generate ``corpus.txt``: the plain-English text the default model's tokenizer (and pretraining) uses.

One sentence or question-and-answer pair per line: arithmetic, unit conversions, number facts,
simple facts about animals, jobs, places and things, everyday sentences and polite chat phrases.
Seeded, so the output is byte-for-byte reproducible; the committed corpus.txt is its output:

    python shared/data/make_corpus.py            # writes shared/data/corpus.txt

The word lists are broad on purpose: a byte-level BPE learns one merge per frequent pair, so the
corpus needs enough distinct words to fill the default 2048-token vocabulary.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
TARGET_BYTES = 500_000

OPENERS = [
    "Thank you for asking.",
    "Sure, here is the answer.",
    "Of course, I am happy to help.",
    "Good question.",
    "Let me think about that.",
    "Here is what I found.",
    "That is a great question.",
    "Happy to explain.",
    "No problem at all.",
    "Certainly.",
    "Great question, thanks.",
    "Let me explain.",
]
CLOSERS = [
    "I hope this helps.",
    "Please let me know if you have another question.",
    "Have a nice day.",
    "Glad I could help.",
    "Feel free to ask me anything else.",
    "You are welcome.",
]
GREETINGS = [
    "Hello! How can I help you today?",
    "Hi there! What would you like to know?",
    "Good morning! What can I do for you?",
    "Good evening! How may I help?",
    "Thanks for your patience.",
    "I am sorry, I do not know the answer to that.",
    "I am not sure, but I will try my best.",
    "Could you say that again, please?",
    "Could you explain what you mean?",
    "Take care and see you soon.",
    "Goodbye, and thank you for the conversation.",
    "Nice to meet you.",
    "How are you today? I am fine, thank you.",
]

NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Maria",
    "Noah",
    "Olivia",
    "Peter",
    "Quinn",
    "Rosa",
    "Sam",
    "Tina",
    "Umar",
    "Vera",
    "William",
    "Xenia",
    "Yusuf",
    "Zoe",
    "Alice",
    "Bruno",
    "Chloe",
    "Daniel",
    "Elena",
    "Felix",
    "Hannah",
    "Isaac",
    "Julia",
    "Lucas",
    "Mia",
    "Nina",
    "Oscar",
    "Paula",
    "Ruby",
    "Simon",
    "Thomas",
    "Victor",
    "Wendy",
    "Aisha",
    "Carlos",
    "Priya",
    "Kenji",
]
# (singular, plural, where it lives, what it eats)
ANIMALS = [
    ("cat", "cats", "in houses with people", "fish and meat"),
    ("dog", "dogs", "in houses with people", "meat and dog food"),
    ("horse", "horses", "on farms and in fields", "grass and hay"),
    ("cow", "cows", "on farms", "grass"),
    ("sheep", "sheep", "on farms and hills", "grass"),
    ("goat", "goats", "on farms and in mountains", "grass and leaves"),
    ("pig", "pigs", "on farms", "almost anything"),
    ("duck", "ducks", "near ponds and rivers", "plants and small insects"),
    ("chicken", "chickens", "on farms", "seeds and grain"),
    ("rabbit", "rabbits", "in fields and burrows", "grass and carrots"),
    ("mouse", "mice", "in fields and old buildings", "seeds and grain"),
    ("fox", "foxes", "in forests and towns", "small animals and berries"),
    ("wolf", "wolves", "in forests", "meat"),
    ("bear", "bears", "in forests and mountains", "berries, fish and honey"),
    ("deer", "deer", "in forests", "leaves and grass"),
    ("lion", "lions", "on the savanna", "meat"),
    ("tiger", "tigers", "in jungles and forests", "meat"),
    ("elephant", "elephants", "on the savanna and in forests", "grass, leaves and fruit"),
    ("giraffe", "giraffes", "on the savanna", "leaves from tall trees"),
    ("zebra", "zebras", "on the savanna", "grass"),
    ("monkey", "monkeys", "in jungles", "fruit and leaves"),
    ("owl", "owls", "in trees and barns", "mice and insects"),
    ("eagle", "eagles", "in high mountains", "fish and small animals"),
    ("frog", "frogs", "near ponds", "insects"),
    ("turtle", "turtles", "in the sea and in ponds", "plants and small animals"),
    ("snake", "snakes", "in grass and deserts", "mice and eggs"),
    ("whale", "whales", "in the ocean", "tiny sea animals"),
    ("dolphin", "dolphins", "in the ocean", "fish"),
    ("shark", "sharks", "in the ocean", "fish and seals"),
    ("bee", "bees", "in hives", "nectar from flowers"),
    ("ant", "ants", "in nests under the ground", "seeds and sweet food"),
    ("butterfly", "butterflies", "in gardens and meadows", "nectar from flowers"),
    ("squirrel", "squirrels", "in trees", "nuts and seeds"),
    ("hedgehog", "hedgehogs", "in gardens and hedges", "insects and worms"),
    ("penguin", "penguins", "in cold places near the sea", "fish"),
    ("camel", "camels", "in deserts", "dry plants"),
    ("kangaroo", "kangaroos", "in Australia", "grass"),
    ("parrot", "parrots", "in warm forests", "seeds, nuts and fruit"),
    ("goose", "geese", "near lakes", "grass and grain"),
    ("hamster", "hamsters", "in cages as pets", "seeds and vegetables"),
]
# (job, what the person does)
JOBS = [
    ("baker", "bakes bread and cakes"),
    ("teacher", "helps students learn"),
    ("doctor", "helps sick people"),
    ("nurse", "takes care of patients"),
    ("farmer", "grows food and raises animals"),
    ("pilot", "flies airplanes"),
    ("driver", "drives a bus or a truck"),
    ("cook", "prepares meals"),
    ("firefighter", "puts out fires"),
    ("police officer", "keeps people safe"),
    ("mail carrier", "delivers letters and packages"),
    ("carpenter", "builds things from wood"),
    ("plumber", "fixes pipes and sinks"),
    ("painter", "paints walls and pictures"),
    ("gardener", "takes care of plants"),
    ("librarian", "looks after books in a library"),
    ("dentist", "takes care of teeth"),
    ("mechanic", "repairs cars"),
    ("tailor", "makes and fixes clothes"),
    ("fisher", "catches fish"),
    ("musician", "plays music"),
    ("writer", "writes stories and books"),
    ("scientist", "studies how the world works"),
    ("engineer", "designs machines and bridges"),
    ("shopkeeper", "sells things in a shop"),
    ("waiter", "brings food to guests"),
    ("photographer", "takes pictures"),
    ("vet", "takes care of sick animals"),
    ("builder", "builds houses"),
    ("cashier", "takes payments at a store"),
]
# (capital, country)
CAPITALS = [
    ("Paris", "France"),
    ("Berlin", "Germany"),
    ("Madrid", "Spain"),
    ("Rome", "Italy"),
    ("London", "England"),
    ("Lisbon", "Portugal"),
    ("Vienna", "Austria"),
    ("Dublin", "Ireland"),
    ("Oslo", "Norway"),
    ("Stockholm", "Sweden"),
    ("Helsinki", "Finland"),
    ("Warsaw", "Poland"),
    ("Athens", "Greece"),
    ("Cairo", "Egypt"),
    ("Tokyo", "Japan"),
    ("Beijing", "China"),
    ("Ottawa", "Canada"),
    ("Canberra", "Australia"),
    ("Nairobi", "Kenya"),
    ("Lima", "Peru"),
    ("Brussels", "Belgium"),
    ("Amsterdam", "the Netherlands"),
    ("Copenhagen", "Denmark"),
    ("Prague", "the Czech Republic"),
    ("Budapest", "Hungary"),
    ("Seoul", "South Korea"),
    ("Bangkok", "Thailand"),
    ("Mexico City", "Mexico"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("full", "empty"),
    ("early", "late"),
    ("old", "new"),
    ("young", "old"),
    ("long", "short"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("loud", "quiet"),
    ("easy", "difficult"),
    ("clean", "dirty"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("heavy", "light"),
    ("inside", "outside"),
    ("left", "right"),
    ("day", "night"),
    ("high", "low"),
    ("near", "far"),
    ("begin", "end"),
    ("push", "pull"),
    ("buy", "sell"),
    ("win", "lose"),
    ("question", "answer"),
    ("first", "last"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink"]
THINGS = [
    "cup",
    "book",
    "pencil",
    "bag",
    "hat",
    "umbrella",
    "ball",
    "lamp",
    "phone",
    "key",
    "blanket",
    "bottle",
    "box",
    "plate",
    "basket",
    "jacket",
    "scarf",
    "notebook",
    "backpack",
    "bicycle",
    "kite",
    "candle",
    "clock",
    "mirror",
    "pillow",
    "towel",
    "shoe",
    "sweater",
    "glove",
    "toothbrush",
]
FURNITURE = ["table", "chair", "sofa", "bed", "shelf", "desk", "cupboard", "floor", "windowsill", "counter"]
PREPOSITIONS = ["on", "under", "next to", "behind", "near"]
FOODS = [
    "apples",
    "bread",
    "rice",
    "soup",
    "cheese",
    "carrots",
    "pasta",
    "eggs",
    "oranges",
    "tomatoes",
    "potatoes",
    "bananas",
    "grapes",
    "pears",
    "peaches",
    "cherries",
    "beans",
    "peas",
    "onions",
    "lettuce",
    "cucumbers",
    "pancakes",
    "noodles",
    "sandwiches",
    "cookies",
    "yogurt",
    "butter",
    "honey",
    "strawberries",
    "lemons",
    "mushrooms",
    "nuts",
    "salad",
    "pizza",
    "dumplings",
    "porridge",
    "muffins",
    "plums",
    "melons",
    "spinach",
]
DRINKS = ["tea", "coffee", "water", "milk", "orange juice", "apple juice", "hot chocolate", "lemonade"]
VEHICLES = ["bus", "train", "bike", "car", "tram", "subway", "ferry", "taxi"]
HOBBIES = [
    "play football",
    "play tennis",
    "swim",
    "go hiking",
    "play chess",
    "draw",
    "knit",
    "cook",
    "dance",
    "play the guitar",
    "play the violin",
    "read comics",
    "go fishing",
    "grow vegetables",
    "build model ships",
    "take photographs",
    "play basketball",
    "ride horses",
    "go skating",
    "sing in a choir",
]
SUBJECTS_AT_SCHOOL = [
    "math",
    "history",
    "science",
    "music",
    "art",
    "geography",
    "reading",
    "writing",
    "biology",
    "chemistry",
    "physics",
    "sports",
]
FEELINGS = [
    ("happy", "the sun is shining"),
    ("tired", "it was a long day"),
    ("excited", "the trip starts tomorrow"),
    ("nervous", "there is a test today"),
    ("proud", "the project is finished"),
    ("sad", "a friend moved away"),
    ("hungry", "it is almost lunchtime"),
    ("calm", "the house is quiet"),
    ("surprised", "a letter arrived"),
    ("thankful", "a neighbor helped with the groceries"),
    ("bored", "it is raining all day"),
    ("curious", "there is a new book on the shelf"),
]
# (body part, what we do with it)
BODY = [
    ("eyes", "see"),
    ("ears", "hear"),
    ("nose", "smell"),
    ("tongue", "taste"),
    ("hands", "hold things"),
    ("feet", "walk"),
    ("legs", "run and jump"),
    ("teeth", "chew food"),
    ("lungs", "breathe"),
    ("heart", "pump blood"),
    ("brain", "think"),
    ("fingers", "touch and write"),
]
# (tool, what it is for)
TOOLS = [
    ("knife", "cut food"),
    ("spoon", "eat soup"),
    ("fork", "eat salad"),
    ("broom", "sweep the floor"),
    ("hammer", "hit nails"),
    ("saw", "cut wood"),
    ("ladder", "reach high places"),
    ("kettle", "boil water"),
    ("oven", "bake bread"),
    ("fridge", "keep food cold"),
    ("umbrella", "stay dry in the rain"),
    ("clock", "tell the time"),
    ("map", "find the way"),
    ("ruler", "measure short lengths"),
    ("scale", "weigh things"),
    ("thermometer", "measure temperature"),
    ("calendar", "see the date"),
    ("needle", "sew clothes"),
    ("shovel", "dig holes"),
    ("brush", "paint walls"),
]
FACTS = [
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does an insect have?", "An insect has 6 legs."),
    ("How many legs does a bird have?", "A bird has 2 legs."),
    ("What do bees make?", "Bees make honey."),
    ("What is ice made of?", "Ice is frozen water."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("What do plants need to grow?", "Plants need water, light and soil to grow."),
    ("What color is a banana?", "A ripe banana is yellow."),
    ("What color are strawberries?", "Strawberries are red."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("Where does the sun set?", "The sun sets in the west."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("What do you call a baby cow?", "A baby cow is called a calf."),
    ("What do you call a baby sheep?", "A baby sheep is called a lamb."),
    ("What do we breathe?", "We breathe air."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("What does the moon go around?", "The moon goes around the Earth."),
    ("How many continents are there?", "There are 7 continents."),
    ("What gas do plants take in?", "Plants take in carbon dioxide and give off oxygen."),
    ("Why do we wear coats in winter?", "We wear coats in winter to stay warm."),
    ("Why do leaves fall in autumn?", "Many trees drop their leaves in autumn to save water in winter."),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = [
    "It is sunny today, so we can go outside.",
    "It is raining, so take an umbrella.",
    "The wind is cold this morning.",
    "Snow covers the roofs in winter.",
    "The sky is clear and full of stars tonight.",
    "It is warm in summer and cold in winter.",
    "Clouds are moving in from the west.",
    "After the rain, the streets are wet.",
    "The morning fog will lift by noon.",
    "Spring brings flowers and longer days.",
    "A thunderstorm is coming, so stay indoors.",
    "The leaves turn red and gold in autumn.",
]
PLACES = [
    "in the kitchen",
    "at home",
    "in the garden",
    "at the library",
    "near the river",
    "in the living room",
    "at school",
    "in the park",
    "at the office",
    "on the porch",
    "by the window",
    "in the small town",
    "at the beach",
    "in the forest",
    "at the market",
    "at the museum",
    "on the balcony",
    "at the station",
]
TIMES = [
    "every morning",
    "after lunch",
    "in the evening",
    "on Sundays",
    "before dinner",
    "at night",
    "on weekends",
    "every day",
    "in the afternoon",
    "once a week",
    "early in the morning",
    "on rainy days",
]
ACTIONS = [
    "reads a book",
    "drinks a cup of tea",
    "makes breakfast",
    "waters the plants",
    "walks to the park",
    "cleans the kitchen",
    "writes a letter",
    "plays the piano",
    "feeds the cat",
    "rides a bike",
    "listens to music",
    "bakes fresh bread",
    "paints a picture",
    "calls a friend",
    "sings a song",
    "takes a short nap",
    "washes the dishes",
    "goes for a run",
    "looks out of the window",
    "buys apples at the market",
    "opens the mail",
    "fixes the old chair",
    "folds the laundry",
    "visits the museum",
    "studies for a test",
    "plants tomatoes",
    "repairs a bicycle",
    "sorts old photos",
]
OBJECTS = ["pencils", "books", "apples", "coins", "cups", "chairs", "stamps", "cookies", "marbles", "shells"]
# (larger unit: plural, singular; smaller unit: plural; smaller units per larger unit)
UNITS = [
    ("meters", "meter", "centimeters", 100),
    ("kilometers", "kilometer", "meters", 1000),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("years", "year", "months", 12),
    ("feet", "foot", "inches", 12),
    ("dollars", "dollar", "cents", 100),
    ("centimeters", "centimeter", "millimeters", 10),
]


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article: 'an owl', 'a red cup'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def arithmetic(rng: random.Random) -> str:
    op = rng.choice(["plus", "minus", "times", "divided by"])
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "plus":
        result = a + b
    elif op == "minus":
        a, b = max(a, b), min(a, b)
        result = a - b
    elif op == "times":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        result = a * b
    else:  # exact division only
        b, result = rng.randint(1, 12), rng.randint(0, 12)
        a = b * result
    question = rng.choice(["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Can you tell me {a} {op} {b}?"])
    answer = rng.choice(["{a} {op} {b} is {r}.", "{a} {op} {b} equals {r}.", "The answer is {r}."])
    return f"{question} {answer}".format(a=a, b=b, op=op, r=result)


def word_problem(rng: random.Random) -> str:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    have, more = rng.randint(2, 30), rng.randint(1, 20)
    if rng.random() < 0.5:
        return (
            f"{name} has {have} {thing} and gets {more} more. How many {thing} does {name} have now? "
            f"{name} has {have + more} {thing} now."
        )
    gives = rng.randint(1, have)
    return (
        f"{name} has {have} {thing} and gives away {gives}. How many {thing} are left? {have - gives} {thing} are left."
    )


def conversion(rng: random.Random) -> str:
    big, big_one, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 20)
    big_word = big_one if n == 1 else big
    if rng.random() < 0.5:
        return f"How many {small} are in {n} {big_word}? There are {n * factor} {small} in {n} {big_word}."
    if n == 1:
        return f"One {big_one} has {factor} {small}."
    return f"{n} {big_word} is the same as {n * factor} {small}."


def number_fact(rng: random.Random) -> str:
    a, b = rng.randint(0, 200), rng.randint(0, 200)
    kind = rng.choice(["after", "before", "bigger", "parity"])
    if kind == "after":
        return f"What number comes after {a}? {a + 1} comes after {a}."
    if kind == "before":
        a = max(a, 1)
        return f"What number comes before {a}? {a - 1} comes before {a}."
    if kind == "bigger":
        if a == b:
            return f"Which is bigger, {a} or {b}? They are the same number."
        return f"Which is bigger, {a} or {b}? {max(a, b)} is bigger than {min(a, b)}."
    even = a % 2 == 0
    return f"Is {a} an even number? {'Yes' if even else 'No'}, {a} is {'even' if even else 'odd'}."


def calendar(rng: random.Random) -> str:
    kind = rng.choice(["day", "month", "season"])
    if kind == "day":
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}? {DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    if kind == "month":
        i = rng.randrange(12)
        return f"Which month comes after {MONTHS[i]}? {MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."
    i = rng.randrange(4)
    return f"What season comes after {SEASONS[i]}? {SEASONS[(i + 1) % 4].capitalize()} comes after {SEASONS[i]}."


def animal(rng: random.Random) -> str:
    one, many, home, eats = rng.choice(ANIMALS)
    return rng.choice(
        [
            f"Where does {_a(one)} live? {_a(one).capitalize()} lives {home}.",
            f"What does {_a(one)} eat? {_a(one).capitalize()} eats {eats}.",
            f"I saw {rng.randint(2, 9)} {many} {rng.choice(PLACES)} yesterday.",
            f"{rng.choice(NAMES)} drew a picture of {_a(rng.choice(COLORS) + ' ' + one)}.",
        ]
    )


def job(rng: random.Random) -> str:
    name, does = rng.choice(JOBS)
    if rng.random() < 0.6:
        return f"What does {_a(name)} do? {_a(name).capitalize()} {does}."
    return f"{rng.choice(NAMES)} wants to be {_a(name)} one day."


def geography(rng: random.Random) -> str:
    capital, country = rng.choice(CAPITALS)
    return rng.choice(
        [
            f"What is the capital of {country}? The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"{rng.choice(NAMES)} took the {rng.choice(VEHICLES)} to {capital} last {rng.choice(SEASONS)}.",
        ]
    )


def opposite(rng: random.Random) -> str:
    word, other = rng.choice(OPPOSITES)
    return f"What is the opposite of {word}? The opposite of {word} is {other}."


def household(rng: random.Random) -> str:
    thing, color = rng.choice(THINGS), rng.choice(COLORS)
    place = f"{rng.choice(PREPOSITIONS)} the {rng.choice(FURNITURE)}"
    return rng.choice(
        [
            f"Where is my {thing}? Your {thing} is {place}.",
            f"The {color} {thing} is {place}.",
            f"{rng.choice(NAMES)} put {_a(color + ' ' + thing)} {place}.",
        ]
    )


def tool(rng: random.Random) -> str:
    name, use = rng.choice(TOOLS)
    return f"What do we use {_a(name)} for? We use {_a(name)} to {use}."


def body(rng: random.Random) -> str:
    part, use = rng.choice(BODY)
    return f"What do we use our {part} for? We use our {part} to {use}."


def spelling(rng: random.Random) -> str:
    word = rng.choice([a[0] for a in ANIMALS] + THINGS + COLORS)
    if rng.random() < 0.5:
        return f"How do you spell {word}? {word.capitalize()} is spelled {'-'.join(word.upper())}."
    return f"How many letters are in the word {word}? The word {word} has {len(word)} letters."


def person(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    feeling, reason = rng.choice(FEELINGS)
    return rng.choice(
        [
            f"{name} feels {feeling} because {reason}.",
            f"On {rng.choice(DAYS)}s, {name} likes to {rng.choice(HOBBIES)}.",
            f"{name} is good at {rng.choice(SUBJECTS_AT_SCHOOL)} and helps {other} with homework.",
            f"{name} takes the {rng.choice(VEHICLES)} to work {rng.choice(TIMES)}.",
            f"{name} and {other} {rng.choice(HOBBIES)} together {rng.choice(TIMES)}.",
            f"{name} {rng.choice(ACTIONS)} {rng.choice(PLACES)} {rng.choice(TIMES)}.",
            f"In {rng.choice(MONTHS)}, {name} visited {other} for {rng.randint(2, 14)} days.",
        ]
    )


def food(rng: random.Random) -> str:
    a, b = rng.sample(FOODS, 2)
    drink = rng.choice(DRINKS)
    return rng.choice(
        [
            f"For lunch we had {a} and {b}.",
            f"Do you like {a}? Yes, I like {a}, but I like {b} more.",
            f"Please buy some {a} and {b} at the store.",
            f"There are {a} on the table and {b} in the basket.",
            f"{rng.choice(NAMES)} drinks {drink} with breakfast every morning.",
            f"Would you like some {drink}? Yes, please, and some {a} too.",
        ]
    )


def fact(rng: random.Random) -> str:
    question, answer = rng.choice(FACTS)
    return f"{question} {answer}" if rng.random() < 0.7 else answer


def chat(rng: random.Random) -> str:
    body_text = rng.choice([arithmetic, conversion, fact, number_fact, animal, job, geography, tool])(rng)
    if rng.random() < 0.5:
        return f"{rng.choice(OPENERS)} {body_text}"
    return f"{body_text} {rng.choice(CLOSERS)}"


def small_talk(rng: random.Random) -> str:
    return rng.choice(GREETINGS + WEATHER + OPENERS)


GENERATORS: list[tuple[Callable[[random.Random], str], int]] = [
    (arithmetic, 6),
    (word_problem, 2),
    (conversion, 4),
    (number_fact, 2),
    (calendar, 1),
    (animal, 3),
    (job, 2),
    (geography, 2),
    (opposite, 1),
    (household, 2),
    (tool, 1),
    (body, 1),
    (spelling, 1),
    (person, 4),
    (food, 2),
    (fact, 2),
    (chat, 4),
    (small_talk, 1),
]


def make_corpus(target_bytes: int = TARGET_BYTES, seed: int = SEED) -> str:
    rng = random.Random(seed)
    funcs, weights = zip(*GENERATORS)
    lines: list[str] = []
    size = 0
    while size < target_bytes:
        line = rng.choices(funcs, weights)[0](rng)
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.txt"))
    parser.add_argument("--bytes", type=int, default=TARGET_BYTES, help="approximate size of the corpus")
    args = parser.parse_args()
    args.out.write_text(make_corpus(args.bytes), encoding="utf-8")


if __name__ == "__main__":
    main()
