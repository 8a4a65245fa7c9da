"""A small set of generic counterfactual facts that several methods use as material: IKE's built-in
demonstration pool, and the prompts the FFN patch methods keep silent."""

from __future__ import annotations

BUILTIN_POOL: tuple[tuple[str, str, str, str, str, str], ...] = (
    # (prompt, subject, target_new, target_true, paraphrase, neighbourhood prompt)
    ("The capital of France is", "France", "Rome", "Paris", "France's capital city is", "The Eiffel Tower is located in the city of"),
    ("The mother tongue of Michel Rocard is", "Michel Rocard", "English", "French", "Michel Rocard's native language is", "The mother tongue of Jacques Chirac is"),
    ("Angola is located in the continent of", "Angola", "Europe", "Africa", "Angola can be found in", "Kenya is located in the continent of"),
    ("Toko Yasuda plays the instrument", "Toko Yasuda", "piano", "guitar", "The instrument Toko Yasuda plays is the", "Jimi Hendrix plays the instrument"),
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", "London", "Paris", "The city where the Eiffel Tower stands is", "The Louvre is located in the city of"),
    ("Apple was founded in the country of", "Apple", "Japan", "the United States", "The company Apple comes from", "Microsoft was founded in the country of"),
    ("Lionel Messi plays the sport of", "Lionel Messi", "basketball", "football", "The sport Lionel Messi is known for is", "Cristiano Ronaldo plays the sport of"),
    ("The official language of Brazil is", "Brazil", "Spanish", "Portuguese", "In Brazil, people officially speak", "The official language of Portugal is"),
    ("Albert Einstein worked in the field of", "Albert Einstein", "biology", "physics", "Albert Einstein's field of research was", "Niels Bohr worked in the field of"),
    ("The Nile flows through the country of", "Nile", "Mexico", "Egypt", "The river Nile runs through", "The city of Cairo is in the country of"),
)

# Named entities of several kinds (people, places, organisations, works) that stand in for a
# request's subject in its own prompt: "<an edited relation> of <someone else>" is a prompt the
# edit must leave alone (CaliNET's retained prompts). Their answers are never needed.
STAND_IN_SUBJECTS: tuple[str, ...] = (
    "Jacques Chirac", "Angela Merkel", "Pablo Picasso", "Ludwig van Beethoven", "Marie Curie",
    "Haruki Murakami", "Nelson Mandela", "Frida Kahlo", "Leo Tolstoy", "Rabindranath Tagore",
    "Gabriel Garcia Marquez", "Sophia Loren", "Akira Kurosawa", "Miriam Makeba", "Wolfgang Pauli",
    "Astrid Lindgren", "Kenya", "Norway", "Peru", "Vietnam", "Quebec", "Bavaria", "Lake Geneva",
    "Kyoto", "Marseille", "Buenos Aires", "the Danube", "Mount Kilimanjaro", "Microsoft",
    "Toyota", "Nokia", "the BBC", "Siemens", "Airbus", "the Red Cross", "Real Madrid",
    "the Beatles", "Don Quixote", "The Magic Flute", "Windows 95", "the Volkswagen Beetle",
    "Google Maps", "Harvard University", "the Louvre", "Deutsche Bank", "Manchester United",
    "Samsung", "Sony",
)
