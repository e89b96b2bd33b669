"""Builder of the versioned prompt set: python rlhf_lib/assets/make_prompts_v1.py rlhf_lib/assets/prompts_v1.jsonl

20 categories x 20 subjects x 5 templates; per category 2 subjects go to eval, 4 to ppo, 14 to rm (fixed rng), so no
subject is shared between splits. Kept for provenance: a new prompt set gets a new version (prompts_v2.jsonl).
"""
import json, random, sys
CATEGORIES = {
 "restaurant": ["a family-run pizza place", "a new ramen shop near the station", "a vegan cafe downtown", "a seaside fish and chips stand", "a steakhouse in the city centre", "a food truck selling tacos", "a tiny sushi bar", "a breakfast diner open all night", "a rooftop tapas bar", "an Indian buffet restaurant", "a Greek taverna by the harbour", "a bakery that serves brunch", "a hotel restaurant", "a Korean barbecue place", "a dumpling house", "a burger joint near campus", "a French bistro", "a Thai noodle bar", "a countryside pub", "a dessert shop that sells waffles"],
 "food": ["homemade lasagna", "a bowl of tomato soup", "a chocolate chip cookie", "a kale salad", "a cheese pizza from the freezer aisle", "a spicy chicken curry", "a blueberry muffin", "a plate of pancakes", "a cup of instant noodles", "a fruit smoothie bowl", "a grilled cheese sandwich", "a slice of carrot cake", "a vegetable stir-fry", "a protein bar", "a bowl of oatmeal", "a sourdough loaf", "a pack of salted crisps", "a mushroom risotto", "a lemon tart", "a bean burrito"],
 "drink": ["a cold brew coffee", "a cup of green tea", "a sparkling lemonade", "a hot chocolate", "an energy drink", "a mango lassi", "an iced latte", "a bottle of kombucha", "a glass of orange juice", "a chai latte", "a flavoured mineral water", "a strawberry milkshake", "a cup of herbal tea", "a double espresso", "a ginger beer", "a bubble tea", "a pint of craft beer", "a glass of red wine", "a coconut water", "a protein shake"],
 "movie": ["a science-fiction movie about time travel", "a romantic comedy set in Paris", "an animated film about a lost dog", "a three-hour historical drama", "a horror movie set in a lighthouse", "a documentary about coral reefs", "a superhero sequel", "a courtroom thriller", "a silent black-and-white film", "a musical about a high-school band", "a heist movie", "a space adventure for kids", "a biopic about a famous painter", "a low-budget zombie film", "a war drama", "a mystery set on a train", "a sports movie about a boxing underdog", "a fantasy epic with dragons", "a road-trip comedy", "a nature film about penguins"],
 "book": ["a mystery novel set in a small village", "a cookbook for beginners", "a self-help book about habits", "a fantasy trilogy", "a biography of a scientist", "a children's picture book about the moon", "a travel guide to Japan", "a collection of short stories", "a history book about ancient Rome", "a poetry collection", "a graphic novel about a detective", "a science-fiction novel about Mars", "a gardening handbook", "a thriller about a stolen painting", "a book on personal finance", "a memoir by a chef", "a romance novel", "a textbook on statistics", "a book of puzzles", "an audiobook of a classic novel"],
 "music": ["a jazz concert in a small club", "a new pop album", "an outdoor music festival", "a classical piano recital", "a heavy metal band's live show", "a folk singer's debut album", "a school orchestra concert", "a hip-hop mixtape", "a karaoke night", "a street musician playing guitar", "an opera performance", "an electronic dance music party", "a country music album", "a choir's holiday concert", "a reggae band at the beach", "a music streaming playlist for studying", "a tribute band's concert", "a lo-fi beats album", "a brass band parade", "a cello and violin duet"],
 "game": ["a puzzle game for phones", "an open-world adventure video game", "a board game about trading", "a racing video game", "a card game for parties", "a multiplayer shooter game", "a farming simulation game", "a chess app", "a retro platform game", "a strategy game about building cities", "a virtual reality game", "a word game", "a cooperative board game", "a football video game", "an escape room", "a trivia quiz night", "a role-playing game with a long story", "a jigsaw puzzle of a mountain", "a fighting game", "a mobile game with in-app purchases"],
 "gadget": ["a budget smartphone", "a pair of wireless earbuds", "a smartwatch", "a laptop for students", "an e-reader", "a portable speaker", "a gaming mouse", "a mechanical keyboard", "a tablet for kids", "a fitness tracker", "a dash camera", "a phone charger", "a noise-cancelling headphone", "a drone with a camera", "a webcam", "a power bank", "a smart light bulb", "a digital camera", "a computer monitor", "a USB microphone"],
 "appliance": ["a robot vacuum cleaner", "a coffee machine", "an air fryer", "a washing machine", "a microwave oven", "a blender", "a dishwasher", "an electric kettle", "a toaster", "a hair dryer", "a standing fan", "a space heater", "a slow cooker", "a rice cooker", "an electric toothbrush", "a refrigerator", "a steam iron", "a dehumidifier", "a bread maker", "a juicer"],
 "hotel": ["a beachfront hotel", "a budget hostel", "a mountain lodge", "a bed and breakfast in the countryside", "an airport hotel", "a boutique hotel in the old town", "a campsite by a lake", "a ski resort", "a motel on the highway", "a holiday apartment rental", "a luxury spa resort", "a cruise ship cabin", "a business hotel", "a treehouse rental", "a family resort with a water park", "a capsule hotel", "a farm stay", "a houseboat rental", "a castle hotel", "a youth hostel near the station"],
 "place": ["a weekend in Lisbon", "a day trip to the seaside", "a visit to a national park", "a walk through a botanical garden", "a small mountain village", "a busy night market", "a city zoo", "an aquarium", "a local farmers market", "a public library", "a shopping mall", "an old lighthouse", "a riverside walking path", "a city's central square", "a science museum", "an art gallery", "a theme park", "a historic castle", "a public swimming pool", "a train ride through the countryside"],
 "vehicle": ["an electric car", "a city bicycle", "a family minivan", "an electric scooter", "a used hatchback", "a motorbike for beginners", "a pickup truck", "a folding bike", "a hybrid SUV", "a campervan", "a city bus service", "a high-speed train", "a ferry crossing", "a rental car", "a mountain bike", "a taxi ride", "a budget airline flight", "a skateboard", "a car-sharing service", "a tram line"],
 "clothing": ["a pair of running shoes", "a winter coat", "a rain jacket", "a pair of jeans", "a wool sweater", "a backpack for hiking", "a pair of sunglasses", "a cotton t-shirt", "a pair of leather boots", "a summer dress", "a baseball cap", "a pair of sandals", "a business suit", "a yoga mat", "a waterproof watch", "a silk scarf", "a pair of slippers", "a handbag", "a pair of gloves", "a swimsuit"],
 "app": ["a note-taking app", "a language learning app", "a weather app", "a photo editing app", "a budgeting app", "a meditation app", "a food delivery app", "a map and navigation app", "a podcast app", "a to-do list app", "a video calling app", "a recipe app", "a fitness app", "a password manager", "a calendar app", "a news app", "a ride-hailing app", "an online banking app", "a sleep tracking app", "a music practice app"],
 "service": ["a haircut at a local barber", "a plumber who fixed a leak", "a dry cleaning service", "a moving company", "a car wash", "a dentist appointment", "an internet provider", "a dog walking service", "a house cleaning service", "a bike repair shop", "a tailor who altered a suit", "a photography studio", "a tax advisor", "a courier delivery", "a phone repair shop", "a gym's personal trainer", "a language tutor", "a veterinary clinic", "a wedding planner", "a customer support hotline"],
 "activity": ["a beginner yoga class", "a cooking workshop", "a pottery class", "a guided city tour", "a scuba diving lesson", "a hiking trip", "a salsa dance class", "a painting workshop", "a rock climbing gym", "a kayaking trip", "a photography course", "a coding bootcamp", "a wine tasting", "a horse riding lesson", "a surfing lesson", "a bird watching walk", "a book club meeting", "a charity fun run", "a chess club", "a stand-up comedy show"],
 "home": ["a memory foam mattress", "an office chair", "a sofa bed", "a wooden dining table", "a desk lamp", "a set of kitchen knives", "a non-stick frying pan", "a houseplant", "a bookshelf", "a set of bath towels", "a scented candle", "a wall clock", "a set of bed sheets", "a garden hose", "a cordless drill", "a shower head", "a pillow", "a rug for the living room", "a laundry basket", "a set of storage boxes"],
 "pet": ["a cat scratching post", "a dog leash", "a bag of dog food", "a fish tank", "a bird cage", "a chew toy for puppies", "a pet carrier", "a cat litter box", "an automatic pet feeder", "a hamster wheel", "a dog bed", "a cat tree", "a pet grooming brush", "a doggy daycare", "a pet camera", "a bag of cat treats", "a pet water fountain", "a rabbit hutch", "a dog training class", "a reptile heat lamp"],
 "toy": ["a building block set", "a remote-control car", "a stuffed teddy bear", "a kite", "a model train set", "a yo-yo", "a science kit for kids", "a dollhouse", "a water pistol", "a toy robot", "a puzzle cube", "a set of crayons", "a wooden train", "a bubble machine", "a trampoline", "a play tent", "a toy kitchen", "a skipping rope", "a magic trick set", "a set of building magnets"],
 "event": ["a friend's birthday party", "a wedding reception", "a school sports day", "a tech conference", "a local food festival", "a New Year's Eve fireworks show", "a football match", "a marathon", "a comic convention", "a job fair", "a farmers' fair", "a charity gala", "a science fair", "a town carnival", "a graduation ceremony", "an art exhibition opening", "a film festival", "a tennis tournament", "a community picnic", "a holiday market"],
}
TEMPLATES = [
    "Write a short review of {s} in two or three sentences.",
    "Describe {s} in two or three sentences.",
    "In two or three sentences, share your opinion of {s}.",
    "Write a brief customer review of {s}, two or three sentences long.",
    "Tell a friend about {s} in two or three sentences.",
]
rng = random.Random(20240601)
rows = {"rm": [], "ppo": [], "eval": []}
for cat, subjects in CATEGORIES.items():
    assert len(subjects) == 20 and len(set(subjects)) == 20, cat
    subs = subjects[:]
    rng.shuffle(subs)
    for i, s in enumerate(subs):
        split = "eval" if i < 2 else "ppo" if i < 6 else "rm"
        for t, tpl in enumerate(TEMPLATES):
            rows[split].append({"category": cat, "subject": s, "template": t, "text": tpl.format(s=s), "split": split})
out = []
for split in ("rm", "ppo", "eval"):
    rng.shuffle(rows[split])
    for i, r in enumerate(rows[split]):
        out.append({"id": f"{split}-{i:04d}", **r})
allsubj = [s for v in CATEGORIES.values() for s in v]
assert len(set(allsubj)) == len(allsubj), "duplicate subjects across categories"
with open(sys.argv[1], "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
print({k: len(v) for k, v in rows.items()})
