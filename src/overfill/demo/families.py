"""The demo's instruction families: templates x topics, written for this project (no third-party data).

Each family is one kind of request a chat model gets (explain, list tips, compare, rewrite, write a
poem or an email, classify, summarise, how-to, facts, code, ...). A template holds `{0}` (and `{1}`
for a topic of two parts, e.g. the pair of a comparison) and may hold `{x}`, filled from the
family's `extras` (a tone, a length hint). prompts.py composes them and splits them: the last
template of each family and every fifth topic are held out, so held-out prompts ask about topics no
training prompt mentions, some in words no training prompt uses.

Most templates ask for short replies ("in two or three sentences", "three tips"): the demo's replies
are cut at a few dozen to a hundred-odd tokens, and a reply that ends before the cut teaches the
decoder a whole answer, end-of-turn included.
"""

FAMILIES: dict[str, dict[str, tuple]] = {
    "explain": {
        "templates": ("Explain {0} in two or three sentences.", "What is {0}?{x}", "Explain {0} to a ten-year-old.{x}",
                      "Give me a short, clear description of {0}."),
        "extras": ("", " Keep it short.", " Answer in one or two sentences."),
        "topics": ("photosynthesis", "the water cycle", "gravity", "inflation", "compound interest", "a black hole",
                   "DNA", "the immune system", "a rainbow", "a solar eclipse", "the greenhouse effect", "a volcano",
                   "an earthquake", "electricity", "magnetism", "evaporation", "a vaccine", "a food chain",
                   "a household budget", "a credit score", "recycling", "a computer virus", "the internet",
                   "a search engine", "a solar panel", "a rechargeable battery", "erosion", "a tsunami", "friction",
                   "an atom", "a habit", "democracy", "a thunderstorm", "a glacier", "fermentation", "a spreadsheet",
                   "an operating system", "a password manager", "a compass", "a telescope", "a microscope",
                   "a vitamin", "a leap year", "a time zone", "the stock market", "a coral reef", "a hurricane",
                   "a heat wave", "a library card", "a recipe"),
    },
    "tips": {
        "templates": ("Give three tips for {0}.", "What are your three best tips for {0}?",
                      "I need advice on {0}. Give me three short tips.", "List a few practical tips for {0}."),
        "topics": ("sleeping better", "saving money", "studying for an exam", "staying focused at work",
                   "learning a new language", "keeping a house plant alive", "running a first 5k", "cooking on a budget",
                   "writing a clear email", "reducing stress", "drinking more water", "keeping a tidy desk",
                   "making friends in a new city", "giving a short speech", "learning the guitar", "staying safe online",
                   "packing for a weekend trip", "waking up early", "reading more books", "taking photos with a phone",
                   "working from home", "preparing for a job interview", "remembering names", "keeping a journal",
                   "eating more vegetables", "walking more each day", "organising a closet", "planning a birthday party",
                   "spending less time on my phone", "looking after a puppy", "painting a small room", "growing tomatoes",
                   "cutting down on sugar", "learning to swim as an adult", "sleeping on a long flight",
                   "meeting deadlines", "staying warm in winter", "keeping a car clean", "hosting a dinner party",
                   "starting to exercise"),
    },
    "compare": {
        "templates": ("What is the difference between {0} and {1}?{x}", "Compare {0} and {1} in two or three sentences.",
                      "How is {0} different from {1}?{x}", "{0} versus {1}: what sets them apart?"),
        "extras": ("", " Keep it brief."),
        "topics": (("tea", "coffee"), ("weather", "climate"), ("a virus", "a bacterium"), ("a lake", "a pond"),
                   ("a crocodile", "an alligator"), ("a simile", "a metaphor"), ("memory", "storage in a computer"),
                   ("a laptop", "a tablet"), ("renting a home", "buying one"), ("walking", "running"),
                   ("baking", "roasting"), ("a hurricane", "a tornado"), ("speed", "velocity"), ("an email", "a letter"),
                   ("a novel", "a short story"), ("a moth", "a butterfly"), ("a violin", "a cello"), ("a city", "a town"),
                   ("a debit card", "a credit card"), ("a frog", "a toad"), ("a planet", "a star"), ("a meteor", "a comet"),
                   ("weight", "mass"), ("a rabbit", "a hare"), ("a sea", "an ocean"), ("a stock", "a bond"),
                   ("a hill", "a mountain"), ("a river", "a stream"), ("a sprint", "a marathon"), ("Python", "JavaScript"),
                   ("a file", "a folder"), ("a website", "an app"), ("a cold", "the flu"), ("butter", "margarine"),
                   ("a museum", "a gallery"), ("a jog", "a hike")),
    },
    "rewrite": {
        "templates": ("Rewrite this sentence to sound more {x}: {0}", "Make this sentence more {x}: \"{0}\"",
                      "Please rephrase the following so it is more {x}: {0}"),
        "extras": ("polite", "formal", "friendly", "concise", "cheerful", "professional"),
        "topics": ("Send me the report now.", "The meeting is moved to Monday.", "I can't come to your party.",
                   "Your order will be late.", "Fix this bug today.", "We need more chairs for the event.",
                   "The shop is closed on Sundays.", "Tell me when you are done.", "I did not like the food.",
                   "You forgot to sign the form.", "The train was late again.", "We ran out of coffee.",
                   "Your package arrived broken.", "Call me back when you can.", "The printer does not work.",
                   "I need the keys by noon.", "This room is too cold.", "The rent goes up next month.",
                   "Bring your own lunch tomorrow.", "The results are not ready yet.", "I want a refund.",
                   "Turn the music down.", "Your essay is too long.", "The bus leaves at six.",
                   "Nobody answered my message.", "Clean the kitchen after you cook.", "The website is down again.",
                   "You have to finish this by Friday.", "Stop parking in my spot.", "The price is too high."),
    },
    "creative": {
        "templates": ("Write a four-line poem about {0}.", "Write a very short story about {0}.", "Write a haiku about {0}.",
                      "Write a short, cheerful rhyme about {0}."),
        "topics": ("a rainy morning", "an old lighthouse", "a lost kitten", "the first day of school", "a quiet forest",
                   "a city at night", "a brave little boat", "falling leaves", "a snowy mountain", "a birthday cake",
                   "a sleepy dragon", "the ocean", "a robot learning to dance", "a garden in spring", "a long train journey",
                   "a grandmother's kitchen", "the stars", "a busy market", "a paper airplane", "a friendly ghost",
                   "a summer storm", "a lonely cloud", "a clever fox", "the full moon", "a music box", "an empty beach",
                   "a tiny seed", "a kite on a windy day", "a broken clock", "a bakery at dawn"),
    },
    "email": {
        "templates": ("Write a short email {0}.", "Write a brief, polite email {0}.", "Draft a two-sentence email {0}.",
                      "Compose a short, friendly message {0}."),
        "topics": ("to a colleague asking to move our meeting to Friday", "to my landlord about a broken heater",
                   "to a teacher saying my child will miss school tomorrow", "to a friend inviting them to dinner on Saturday",
                   "to a customer apologising for a late delivery", "to my manager asking for a day off next week",
                   "to a neighbour about a parcel left at my door", "thanking an interviewer for their time",
                   "to a client with the invoice for last month", "to my team announcing a new time for the weekly call",
                   "to a shop asking whether an item is back in stock", "to a coach saying my son will join the team",
                   "to a dentist asking to move an appointment", "to a hotel asking about a late check-in",
                   "thanking a colleague for their help on a project", "to a library about a book I lost",
                   "welcoming a new member to my team", "to a plumber asking for a quote",
                   "to a professor asking for more time on an essay", "congratulating a friend on a new job",
                   "to a gym cancelling my membership", "to a supplier asking for an updated price list",
                   "to parents reminding them of the school trip on Friday", "to a restaurant booking a table for six",
                   "offering to help at the next neighbourhood clean-up"),
    },
    "sentiment": {
        "templates": ("Is this review positive or negative? \"{0}\"",
                      "Classify the sentiment of this review as positive, negative or neutral: {0}",
                      "Does this customer sound happy or unhappy? {0}"),
        "topics": ("The soup was cold and the waiter ignored us.", "Best haircut I have had in years, thank you!",
                   "The hotel was fine, nothing special.", "My phone broke after two days.",
                   "The staff were kind and the room was spotless.", "Delivery took a month and nobody replied to my emails.",
                   "I love how light and warm this jacket is.", "The film was far too long and rather dull.",
                   "Great value, I will order again.", "The app keeps crashing when I open it.",
                   "The tour guide made the whole trip fun.", "It works, but the instructions were confusing.",
                   "The pizza arrived hot and tasted amazing.", "Terrible battery life, I am returning it.",
                   "A cosy little cafe with lovely cakes.", "The seats were uncomfortable and the sound was bad.",
                   "The course taught me more than I expected.", "The shoes fell apart within a week.",
                   "Friendly service and fair prices.", "The room smelled of smoke and the bed was hard.",
                   "The book was gripping from start to finish.", "Customer support solved my problem in minutes.",
                   "The paint peeled off after one wash.", "An average meal at an average price.",
                   "The garden centre had everything I needed."),
    },
    "odd_one_out": {
        "templates": ("Which is the odd one out, and why: {0}?", "One of these does not belong with the others: {0}. Which one?",
                      "Find the item that does not fit in this list and explain why: {0}."),
        "topics": ("apple, banana, carrot, cherry", "car, bus, train, chair", "red, blue, seven, green",
                   "piano, guitar, violin, hammer", "dog, cat, eagle, cow", "Paris, London, Tokyo, Africa",
                   "circle, square, triangle, spoon", "Monday, Friday, June, Sunday", "salmon, tuna, shark, dolphin",
                   "oak, pine, rose, maple", "shirt, trousers, jacket, pillow", "milk, cheese, bread, yogurt",
                   "Mars, Venus, Moon, Jupiter", "pen, pencil, crayon, plate", "lion, tiger, leopard, wolf",
                   "copper, iron, gold, wood", "tennis, football, chess, rugby", "rain, snow, hail, sand",
                   "knife, fork, spoon, cup", "bee, ant, spider, beetle", "English, Spanish, Brazil, French",
                   "happy, glad, cheerful, angry", "nose, ear, eye, knee", "two, four, six, nine", "inch, mile, litre, metre"),
    },
    "summarise": {
        "templates": ("Summarise this in one sentence: {0}", "What is the main point of this text? {0}",
                      "Give a one-line summary of the following. {0}", "Sum up this short text briefly: {0}"),
        "topics": (
            "The town library will close for two weeks in March while workers replace the roof. Books can be "
            "returned at the town hall during that time.",
            "Our team finished the new website a week early. Testing found only two small problems, and both were "
            "fixed the same day.",
            "A heavy storm knocked down trees across the valley last night. Several roads are closed, and crews "
            "expect to clear them by the evening.",
            "The school will start fifteen minutes later from next term. Parents said the change will make the "
            "morning traffic easier.",
            "Sales of electric bikes doubled this year. Shop owners say people want a cheap way to get to work "
            "without sitting in traffic.",
            "Maya planted a small vegetable garden in spring. By August she was giving away tomatoes and beans to "
            "all her neighbours.",
            "The museum has opened a new room about the history of flight. It includes a model of the first plane "
            "and a simulator for children.",
            "Scientists found that people who walk for twenty minutes a day sleep better. The effect was strongest "
            "for those who walked in the morning.",
            "The bakery on Main Street is moving to a bigger shop next door. It will close for three days during "
            "the move and reopen with a cafe.",
            "A local charity collected over two thousand coats this winter. Volunteers sorted them and gave them to "
            "families across the city.",
            "The new phone has a larger screen and a better camera. However, its battery lasts less than last "
            "year's model.",
            "After months of planning, the village held its first music festival. Around five hundred people came, "
            "and the organisers hope to repeat it.",
            "The company will let staff work from home two days a week. Managers hope this will help people "
            "balance work and family.",
            "Tom tried to fix the leaking tap himself but made it worse. In the end he called a plumber, who fixed "
            "it in ten minutes.",
            "The river reached its highest level in ten years after a week of rain. Homes near the bank were "
            "protected by new flood walls.",
            "The city is adding fifty new bus stops next year. Most will be in neighbourhoods that have had no "
            "service until now.",
            "A study of school lunches found that children eat more vegetables when they help to cook them. Several "
            "schools now run cooking clubs.",
            "The football club signed a young goalkeeper from a small team. Fans are excited, but the coach says he "
            "needs time to settle in.",
            "Prices at the farmers' market rose this summer because of the dry weather. Many farmers had smaller "
            "harvests than usual.",
            "The hiking trail to the waterfall has reopened after repairs. Visitors are asked to stay on the path "
            "and take their rubbish home.",
        ),
    },
    "howto": {
        "templates": ("How do I {0}? Answer in a few short steps.", "What are the steps to {0}?",
                      "Explain briefly how to {0}.", "Walk me through how to {0}."),
        "topics": ("boil an egg", "fix a flat bicycle tyre", "make a cup of tea", "tie a tie", "plant a tree",
                   "restart a home router", "wash a wool sweater", "fold a paper airplane", "back up my phone",
                   "iron a shirt", "clean a laptop keyboard", "cook rice on the stove", "remove a coffee stain",
                   "write a thank-you note", "set up a new email account", "hang a picture on a wall", "make pancakes",
                   "start a compost bin", "sharpen a kitchen knife", "repot a plant", "make a grocery list",
                   "wrap a present", "unclog a sink", "take a screenshot on a computer", "brew coffee in a French press",
                   "prepare for a power cut", "pack a suitcase", "change a light bulb", "make a simple salad",
                   "clean a window without streaks"),
    },
    "countries": {
        "templates": ("What is the capital of {0}?", "Which language is mostly spoken in {0}?",
                      "Name one famous place to visit in {0}.", "Tell me one interesting fact about {0}."),
        "topics": ("France", "Japan", "Brazil", "Canada", "Egypt", "Kenya", "India", "Australia", "Mexico", "Italy",
                   "Norway", "Argentina", "Thailand", "Spain", "Germany", "Peru", "Greece", "Vietnam", "Turkey", "Ireland",
                   "Portugal", "Morocco", "Chile", "Sweden", "South Korea", "New Zealand", "Poland", "Ghana", "Iceland",
                   "Indonesia"),
    },
    "animals": {
        "templates": ("How many legs does {0} have?", "Where does {0} usually live?", "What does {0} eat?",
                      "Tell me two facts about {0}."),
        "topics": ("a spider", "an octopus", "a penguin", "a camel", "a honeybee", "a kangaroo", "a dolphin", "an owl",
                   "a frog", "a horse", "an ant", "a crab", "a giraffe", "a polar bear", "a parrot", "a snail",
                   "an elephant", "a bat", "a shark", "a lion", "a beetle", "a cow", "an eagle", "a turtle", "a rabbit",
                   "a whale", "a starfish", "a squirrel", "a goat", "a butterfly"),
    },
    "code": {
        "templates": ("Write a Python one-liner that {0}.", "Write a short Python function that {0}.",
                      "Show a line of Python code that {0}.", "Write a small JavaScript snippet that {0}."),
        "topics": ("reverses a string", "sums a list of numbers", "counts the vowels in a string",
                   "removes duplicates from a list", "checks whether a number is even", "finds the largest number in a list",
                   "reads a text file into a list of lines", "squares every number in a list", "joins a list of words with spaces",
                   "sorts a list of names alphabetically", "turns a string into upper case", "checks whether a word is a palindrome",
                   "counts the words in a sentence", "builds a dictionary from two lists", "drops empty strings from a list",
                   "flattens a list of lists", "rounds a number to two decimal places", "gets the last item of a list",
                   "swaps two variables", "prints the numbers from 1 to 10", "finds the average of a list of numbers",
                   "checks whether a list is empty", "repeats a string three times", "finds the length of the longest word"),
    },
    "words": {
        "templates": ("What does the word \"{0}\" mean?", "Use the word \"{0}\" in a sentence.",
                      "Give a synonym and an antonym for \"{0}\".", "Define \"{0}\" in simple terms."),
        "topics": ("ambitious", "fragile", "generous", "curious", "reluctant", "vivid", "humble", "ancient", "brief",
                   "cautious", "eager", "gloomy", "honest", "loyal", "modest", "nervous", "patient", "rare", "stubborn",
                   "tidy", "vast", "witty", "abundant", "clumsy", "fierce", "gentle", "hollow", "keen", "mellow", "swift"),
    },
    "ideas": {
        "templates": ("Give me three ideas for {0}.", "Suggest a few ideas for {0}.", "I need ideas for {0}. List three.",
                      "Brainstorm three quick ideas for {0}."),
        "topics": ("a rainy weekend at home", "a birthday gift for a friend who loves cooking", "a healthy breakfast",
                   "a school fundraiser", "a short family day trip", "a team-building activity", "a science fair project",
                   "a cheap evening out", "a garden party", "a quick lunch at work", "a name for a new bakery",
                   "a name for a pet hamster", "a podcast about history", "a new ice cream flavour", "a book club's first meeting",
                   "decorating a small bedroom", "a summer reading list for teenagers", "using leftover rice",
                   "a game for a long car ride", "a club for people who like hiking", "a thank-you gift for a teacher",
                   "a fun way to learn maths", "a cosy winter evening", "a short video about my town", "a picnic menu"),
    },
    "advice": {
        "templates": ("Should I {0}? Give a balanced answer in a few sentences.", "What are the pros and cons if I {0}?",
                      "I am thinking about whether to {0}. What should I consider?", "Help me decide whether to {0}."),
        "topics": ("learn to code", "buy an electric car", "take a gap year", "adopt a cat", "work from home",
                   "move to a bigger city", "start running in the mornings", "learn to play the piano", "buy a used laptop",
                   "go back to university", "get a dog while living in a flat", "start a small online shop",
                   "cycle to work", "take a cooking class", "switch to a standing desk", "grow my own vegetables",
                   "travel alone for the first time", "ask for a raise", "join a choir", "stop drinking coffee"),
    },
}
