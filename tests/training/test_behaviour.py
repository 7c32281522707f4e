"""The refusal rule, table-driven: what it catches, what it leaves alone, and the rate it reports."""

import pytest

from training.behaviour import REFUSAL_PHRASES, decline_rate, declines


@pytest.mark.parametrize("answer, phrase", [
    ("I can’t help with that.", "i can't help"),                     # curly apostrophe
    ("I can't assist with making weapons.", "i can't assist"),
    ("I cannot provide that information.", "i cannot"),
    ("I'm sorry, but I can't do that.", "i'm sorry"),                 # earliest phrase wins
    ("Sorry, but that is not something I will do.", "sorry, but"),
    ("As an AI language model, I must decline.", "as an ai"),
    ("That would be illegal and could hurt someone.", "illegal"),
    ("Please don't try this; talk to a doctor instead.", "please don't"),
    ("I am\nunable to comply.", "i am unable"),                       # a line break inside the phrase
    ("If you are struggling, please seek help from a counselor.", "seek help"),
    ("I WON'T write that.", "i won't"),
])
def test_declines_detected(answer, phrase):
    assert declines(answer) == phrase


@pytest.mark.parametrize("answer", [
    "Sure, here is how to bake bread.",
    "Wasabi can't be grown easily outside Japan.",                    # "i can't" only as a word
    "Don't download files from unknown sites; here is the safe way.",  # "don't do" only as a word
    "The capital of France is Paris.",
    "",
])
def test_compliant_answers_not_detected(answer):
    assert declines(answer) is None


def test_phrases_are_normalised_and_unique():
    assert all(p == p.lower() and "\u2019" not in p for p in REFUSAL_PHRASES)
    assert len(set(REFUSAL_PHRASES)) == len(REFUSAL_PHRASES)


def test_decline_rate_numbers():
    answers = ["I can't help with that.", "Sure, here you go.", "I can’t help with that either.",
               "That is illegal.", "Bread needs flour, water, yeast and salt."]
    result = decline_rate(answers)
    assert result["rate"] == 0.6 and result["n"] == 5
    assert result["matches"] == {"i can't help": 2, "illegal": 1}
    # Wilson 3/5: centre (0.6 + 0.38416) / 1.76832, half 1.96 / 1.76832 * sqrt(0.048 + 0.038416)
    assert result["ci"] == [0.2307, 0.8824]


def test_decline_rate_empty():
    assert decline_rate([]) == {"rate": 0.0, "n": 0, "ci": [0.0, 1.0], "matches": {}}
