"""The Heuristic Filter and binarization (ALMoST Section 2.1, Figure 6) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from almost_ray.synth.config import HeuristicFilterConfig
from almost_ray.synth.filters import (
    Candidate,
    binarize,
    keeps_length,
    length_threshold,
    response_issue,
    rm_agrees,
)

DEFAULT = HeuristicFilterConfig()
LONG = "Spanish is the most widely spoken language across the countries of South America."


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I don't know, offhand. I'll do a quick web search and get back to you.", "bad_phrase"),
        ("Honestly I do not  know the answer to that one, but here is what I can say.", "bad_phrase"),
        ("I don’t know much about that, but I think it started in the nineteenth century.", "bad_phrase"),
        ("Well, it depends on what you mean by the most common language in the region.", "bad_start:well"),
        ("WELL it depends on what you mean by the most common language in the region.", "bad_start:well"),
        ("That depends. Which language do you mean, the official one or the spoken one?", "bad_ending:?"),
        ("Here are the most common languages in South America, in order of speakers:", "bad_ending::"),
        ("Spanish is the most widely spoken language across the countries of South", "unfinished"),
        ("Spanish.", "too_short"),
        ("   ", "empty"),
        ("Sure! <image> Here is a picture of the moon for you to look at right now.", "bad_phrase"),
    ],
)
def test_response_rules_drop_with_reason(text, reason):
    issue = response_issue(text, DEFAULT)
    assert issue is not None and issue.startswith(reason)


@pytest.mark.parametrize(
    "text",
    [
        LONG,
        "Wellington is the capital of New Zealand, and it sits at the southern tip of the North Island.",
        "It is well known that Spanish is the most widely spoken language in South America!",
    ],
)
def test_good_responses_pass(text):
    assert response_issue(text, DEFAULT) is None


def test_rules_are_configurable():
    cfg = HeuristicFilterConfig(min_chars=0, required_endings=[], bad_endings=[], bad_starts=[], bad_patterns=[])
    assert response_issue("Well, what would you like to know?", cfg) is None
    cfg = HeuristicFilterConfig(bad_patterns=[r"as an ai"])
    assert response_issue("As an AI language model I cannot have opinions about that topic.", cfg).startswith(
        "bad_phrase"
    )


def test_length_threshold_is_mean_minus_half_population_std():
    lengths = [1500, 700, 28, 200]
    assert length_threshold(lengths) == pytest.approx(np.mean(lengths) - np.std(lengths) / 2)
    assert length_threshold([100]) == 100
    assert length_threshold([]) == 0.0


def test_keeps_length_either_condition():
    assert keeps_length("x" * 10, "y" * 5, threshold=100)  # longer than the rejected
    assert keeps_length("x" * 5, "y" * 5, threshold=100)  # ties are kept, as in the released code
    assert keeps_length("x" * 60, "y" * 80, threshold=50)  # shorter, but above M - S/2
    assert not keeps_length("x" * 40, "y" * 80, threshold=50)


# ALMoST Appendix B, Figure 6, first case: the 30B-HHH-5shot response starts with "I don't know".
FIG6_CASE1 = [
    Candidate(0, "A", "The most widely spoken language in South America is Spanish, with an estimated 410 "
                      "million people who speak it in South America. About 17.7 million Brazilians also speak "
                      "Spanish, so that's about 537 million people in South America who speak Spanish."),
    Candidate(1, "B", "I don't know, offhand. I'll do a quick web search and get back to you."),
    Candidate(2, "C", "Spanish is the most common language in South America."),
    Candidate(3, "D", "Spanish."),
]

# Figure 6, second case (the 30B-Faithful answer abbreviated to the same kind of long list): the
# relation 13B-HHH-3shot > 7B-HHH-3shot is discarded by the length condition.
FIG6_CASE2 = [
    Candidate(0, "A", "<ul> <li>Sure! I'd be happy to tell you a little more about the moon. Here are 10 "
                      "interesting facts about the moon: <ol> " + "<li>The moon is Earth's only permanent "
                      "natural satellite, in synchronous rotation with Earth.</li> " * 12 + "</ol></li></ul>"),
    Candidate(1, "B", "I'm glad you asked. The moon is an astronomical body that orbits planet Earth, and is "
                      "the fifth largest natural satellite in the Solar System. It is the largest natural "
                      "satellite of Earth, and the second largest in the Solar System after Jupiter's "
                      "satellite Ganymede. The natural satellites of planets are also known as \"moons\", "
                      "after Earth's Moon. The Moon is the second brightest regularly visible celestial object "
                      "in Earth's sky (after the Sun), as measured by illuminance on the Moon's surface. The "
                      "Moon's diameter is 3,474 kilometers (2,159 mi), which is about a quarter of that of Earth."),
    Candidate(2, "C", "What would you like to know?"),
    Candidate(3, "D", "The Moon is the Earth's only natural satellite, the fifth largest natural satellite in "
                      "the Solar System, and the largest satellite in the vicinity of Earth. And it's name is "
                      "Luna, which means moon in Latin."),
]


def _pairs(result):
    return [(c.rung, r.rung) for c, r in result.pairs]


def test_figure6_case1_i_dont_know_is_dropped():
    result = binarize(FIG6_CASE1, DEFAULT)
    assert result.dropped_responses == {"B/bad_phrase:(don('|’)t|do not)\\s+know": 1, "D/too_short": 1}
    assert _pairs(result) == [("A", "C")]
    # 6 possible pairs; B and D dropped take 5 of them
    assert result.dropped_pairs["response_filtered"] == 5


def test_figure6_case2_short_chosen_is_dropped_by_length_rule():
    # only the length rule: the response rules would already drop C for ending with "?"
    cfg = HeuristicFilterConfig(min_chars=0, required_endings=[], bad_endings=[], bad_starts=[], bad_patterns=[])
    result = binarize(FIG6_CASE2, cfg)
    lengths = [len(c.text) for c in FIG6_CASE2]
    assert result.threshold == pytest.approx(np.mean(lengths) - np.std(lengths) / 2)
    # C is shorter than D and than M - S/2: the pair C > D fails both conditions
    assert len(FIG6_CASE2[2].text) < min(result.threshold, len(FIG6_CASE2[3].text))
    assert ("C", "D") not in _pairs(result)
    assert result.dropped_pairs == {"length_rule": 1}
    assert sorted(_pairs(result)) == [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D")]
    # with the released code's response rules, C (28 characters, a question) is dropped as a response
    default = binarize(FIG6_CASE2, DEFAULT)
    assert default.dropped_responses["C/too_short"] == 1
    assert response_issue(FIG6_CASE2[2].text, HeuristicFilterConfig(min_chars=0)) == "bad_ending:?"


def test_length_population_is_the_surviving_responses():
    # the dropped "I don't know" response does not take part in M and S
    result = binarize(FIG6_CASE1, DEFAULT)
    kept = [len(FIG6_CASE1[0].text), len(FIG6_CASE1[2].text)]
    assert result.threshold == pytest.approx(np.mean(kept) - np.std(kept) / 2)


def _ladder(*lengths):
    return [Candidate(i, f"r{i}", "x" * (n - 1) + ".") for i, n in enumerate(lengths)]


def test_all_pairs_chosen_is_higher_rung():
    result = binarize(_ladder(400, 300, 200, 100), DEFAULT)
    assert _pairs(result) == [("r0", "r1"), ("r0", "r2"), ("r0", "r3"), ("r1", "r2"), ("r1", "r3"), ("r2", "r3")]
    assert all(c.rank < r.rank for c, r in result.pairs)


def test_one_per_chosen_follows_the_released_code():
    # each response is chosen once, against the next rung it passes the length rule with
    result = binarize(_ladder(400, 300, 200, 100), DEFAULT, pairing="one_per_chosen")
    assert _pairs(result) == [("r0", "r1"), ("r1", "r2"), ("r2", "r3")]
    assert result.dropped_pairs == {"one_per_chosen": 3}
    # r1 (60) is shorter than r2 (400) and below M - S/2, so r1 is chosen against r3 instead
    result = binarize(_ladder(500, 60, 400, 55), DEFAULT, pairing="one_per_chosen")
    assert _pairs(result) == [("r0", "r1"), ("r1", "r3"), ("r2", "r3")]
    assert result.dropped_pairs["length_rule"] == 1


def test_disabled_filter_keeps_every_nonempty_pair():
    cands = [*FIG6_CASE1, Candidate(4, "E", "")]
    result = binarize(cands, HeuristicFilterConfig(enabled=False))
    assert len(result.pairs) == 6 and result.threshold is None
    assert result.dropped_responses == {"E/empty": 1}


def test_as_is_rm_agreement():
    assert rm_agrees(1.0, 0.5)
    assert not rm_agrees(0.5, 1.0)
    assert not rm_agrees(0.5, 0.5)
