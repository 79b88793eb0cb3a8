"""The embedded demo dataset (``builtin:demo``): readable replies, users who disagree.

How it is made (deterministic for a seed, no files):

* Every reply to a prompt has six visible properties ``f(y) ∈ {0,1}^6``: long (4 tips, not 2),
  formal (register of every sentence), bullets (a list, not prose), hedged ("might", "I think"),
  technical (a sentence of jargon) and warm (a friendly opener and closer). Text comes from
  topic-specific tips put into varied sentence templates, so the same property reads differently
  across replies.
* User ``u`` has a taste ``w_u = B* a_u + e_u`` over the properties: a shared rank-2 structure
  ``B* [6, 2]`` with user loadings ``a_u ~ N(0, I)`` plus individual deviations
  ``e_u ~ N(0, 0.25² I)``. Tastes conflict (one user likes bullets and brevity, another long
  formal prose), so no single reward fits everyone.
* A pair is two replies to the same prompt with different properties; ``u`` prefers the first
  with probability ``σ(β · w_u·(f(y1) − f(y2)))``, ``β = 2``: labels are noisy, as real ones are.
* Users get 60 to 180 comparisons each (few, so sharing matters).

The best accuracy any model can reach is the Bayes rate ``E[max(p, 1 − p)]`` over the pairs;
``ceiling_accuracy()`` computes it exactly from the generating probabilities (about 0.85 for the
default seed, see the README).
"""

from __future__ import annotations

import math
import random

from .records import Comparison, DataError

USERS = ["ava", "ben", "chen", "dara", "eli", "fatima", "gus", "hana", "ivan", "jo"]
PROPERTIES = ["long", "formal", "bullets", "hedged", "technical", "warm"]
BETA = 2.0

# topic: (prompts, tips as verb phrases, technical sentences)
TOPICS = {
    "houseplants": (
        ["How do I keep my houseplants alive?", "My plants keep dying. What am I doing wrong?"],
        [
            "water only when the top inch of soil is dry",
            "put the pots near a bright window",
            "use pots with drainage holes",
            "feed them a diluted fertiliser in spring",
            "wipe dust off the leaves now and then",
        ],
        [
            "Overwatering starves roots of oxygen, which invites root rot from Pythium fungi.",
            "Most foliage plants photosynthesise best at 10,000 to 20,000 lux of indirect light.",
        ],
    ),
    "sleep": (
        ["How can I sleep better?", "Any advice for falling asleep faster?"],
        [
            "go to bed at the same time every night",
            "keep the bedroom cool and dark",
            "stop looking at screens an hour before bed",
            "avoid coffee after lunch",
            "get some daylight in the morning",
        ],
        [
            "Blue light suppresses melatonin secretion by the pineal gland.",
            "Caffeine has a half-life of about five hours because it is cleared by CYP1A2.",
        ],
    ),
    "budget": (
        ["How do I start a personal budget?", "What is a simple way to save money each month?"],
        [
            "write down everything you spend for a month",
            "set aside savings on payday",
            "cancel subscriptions you do not use",
            "plan meals before you shop",
            "keep a small emergency fund",
        ],
        [
            "The 50/30/20 rule allocates net income to needs, wants and savings.",
            "Compound interest grows savings exponentially at rate (1 + r) to the power n.",
        ],
    ),
    "running": (
        ["How should a beginner start running?", "I want to take up jogging. Any tips?"],
        [
            "start with short runs mixed with walking",
            "buy shoes that fit your stride",
            "increase your distance slowly each week",
            "rest at least one day between runs",
            "run at a pace where you can still talk",
        ],
        [
            "Aerobic base training raises mitochondrial density in slow-twitch muscle fibres.",
            "Raising weekly mileage by over ten percent raises the risk of stress fractures.",
        ],
    ),
    "python": (
        ["How do I get better at Python?", "What is the best way to learn to code in Python?"],
        [
            "write a small project you actually care about",
            "read other people's code",
            "learn to use the debugger",
            "write tests for your functions",
            "practise a little every day",
        ],
        [
            "Generators evaluate lazily, so they hold one item in memory at a time.",
            "The GIL serialises bytecode execution, so threads help with I/O, not CPU work.",
        ],
    ),
    "cooking": (
        ["How can I cook more at home?", "I never cook. Where do I start?"],
        [
            "learn three simple recipes by heart",
            "keep basic spices in the cupboard",
            "cook a big batch on Sunday",
            "sharpen your knife",
            "taste as you go",
        ],
        [
            "The Maillard reaction between amino acids and sugars browns food above 140 °C.",
            "Salt denatures surface proteins, which helps meat retain moisture.",
        ],
    ),
    "interview": (
        ["How do I prepare for a job interview?", "Any advice for my first interview?"],
        [
            "research the company beforehand",
            "prepare short stories about past work",
            "practise answers out loud",
            "prepare two questions to ask them",
            "arrive ten minutes early",
        ],
        [
            "Structured interviews predict job performance better than unstructured ones.",
            "The STAR format orders an answer as situation, task, action and result.",
        ],
    ),
    "language": (
        ["How can I learn a new language quickly?", "What helps when learning Spanish?"],
        [
            "practise with flashcards every day",
            "listen to podcasts in the language",
            "talk with native speakers early",
            "learn the most common words first",
            "label things around your home",
        ],
        [
            "Spaced repetition schedules reviews just before the forgetting curve drops.",
            "Comprehensible input theory holds that acquisition needs input slightly above level.",
        ],
    ),
}

OPENERS = [
    "What a great question, I'm glad you asked!",
    "Oh, I love this question!",
    "Happy to help with this, you've got this!",
]
CLOSERS = [
    "Hope this helps, and good luck!",
    "Wishing you the best with it!",
    "You'll do great, take care!",
]
FORMAL = [
    "It is advisable to {t}.",
    "One should {t}.",
    "It is recommended that you {t}.",
    "A sensible step is to {t}.",
]
CASUAL = ["Just {t}.", "Honestly, {t} and you're good.", "Try to {t}, works for me.", "Oh and {t}."]
FORMAL_HEDGED = [
    "It may perhaps be advisable to {t}.",
    "One could possibly {t}, I believe.",
    "It might be worth trying to {t}, though results may vary.",
]
CASUAL_HEDGED = [
    "Maybe {t}? Not totally sure though.",
    "I think you could {t}, kind of.",
    "Possibly {t}, I guess it depends.",
]


def _reply(rng: random.Random, tips: list[str], tech: list[str], f: tuple[int, ...]) -> str:
    long, formal, bullets, hedged, technical, warm = f
    templates = [[CASUAL, CASUAL_HEDGED], [FORMAL, FORMAL_HEDGED]][formal][hedged]
    chosen = rng.sample(tips, 4 if long else 2)
    sentences = [rng.choice(templates).format(t=t) for t in chosen]
    if technical:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(tech))
    body = "\n".join("- " + s for s in sentences) if bullets else " ".join(sentences)
    if warm:
        body = f"{rng.choice(OPENERS)}\n{body}\n{rng.choice(CLOSERS)}"
    return body


def _tastes(rng: random.Random) -> dict[str, list[float]]:
    k, d = 2, len(PROPERTIES)
    basis = [[rng.gauss(0, 1) for _ in range(k)] for _ in range(d)]  # B* [6, 2]
    tastes = {}
    for user in USERS:
        a = [rng.gauss(0, 1) for _ in range(k)]
        tastes[user] = [
            sum(basis[i][j] * a[j] for j in range(k)) + rng.gauss(0, 0.25) for i in range(d)
        ]
    return tastes


def generate(seed: int = 0) -> tuple[list[Comparison], list[float]]:
    """All demo comparisons and, for each, the probability its label had of being drawn."""
    rng = random.Random(seed)
    tastes = _tastes(rng)
    topics = list(TOPICS.values())
    data, probs = [], []
    for user in USERS:
        for _ in range(rng.randint(60, 180)):
            prompts, tips, tech = rng.choice(topics)
            f1 = tuple(rng.randint(0, 1) for _ in PROPERTIES)
            f2 = f1
            while f2 == f1:
                f2 = tuple(rng.randint(0, 1) for _ in PROPERTIES)
            y1, y2 = _reply(rng, tips, tech, f1), _reply(rng, tips, tech, f2)
            margin = BETA * sum(w * (a - b) for w, a, b in zip(tastes[user], f1, f2, strict=True))
            p1 = 1 / (1 + math.exp(-margin))
            first = rng.random() < p1
            chosen, rejected = (y1, y2) if first else (y2, y1)
            data.append(Comparison(rng.choice(prompts), chosen, rejected, user, row=len(data) + 1))
            probs.append(p1 if first else 1 - p1)
    return data, probs


def ceiling_accuracy(seed: int = 0) -> float:
    """Bayes-optimal accuracy on the demo: a perfect per-user model predicts the likelier side."""
    _, probs = generate(seed)
    return sum(max(p, 1 - p) for p in probs) / len(probs)


def builtin(source: str) -> list[Comparison]:
    """``builtin:demo`` or ``builtin:demo:SEED``."""
    name, _, seed = source.removeprefix("builtin:").partition(":")
    if name != "demo" or (seed and not seed.isdigit()):
        raise DataError(f"{source}: unknown builtin dataset; use builtin:demo or builtin:demo:SEED")
    return generate(int(seed or 0))[0]
