"""The concept library on the real default model: search, steering, inspect, contrast, logits."""

import re
import time

import pytest

import workbench as wb
from workbench._sync import run
from workbench.features.concepts import RECOMMENDED_STRENGTH
from workbench.features.library import concept_library

TOKYO = [{"role": "user", "content": "Give me tourist information about Tokyo."}]
PIRATE_WORDS = re.compile(r"\b(arr+|matey|mateys|ahoy|ye|yer|treasure|ship|ships|sea|seas|sail|sailing|pirate|pirates|"
                          r"captain|aye|plunder|grog|booty|landlubber|scallywag|buccaneer|deck|hearties|shiver|timbers)\b", re.I)
ENGLISH = re.compile(r"\b(the|and|of|to|a|in|is|you|for|with|are|it|on|be)\b", re.I)


@pytest.fixture(scope="module")
def features(default_model):
    return default_model.features


def test_library_is_large_and_loads_from_cache_fast(default_model, features):
    assert len(features) >= 40
    assert {f.layer for f in features} <= {6, 7}
    t0 = time.perf_counter()
    again = run(concept_library(default_model))
    assert time.perf_counter() - t0 < 1.0          # cached load (the acceptance figure)
    assert [f.id for f in again] == [f.id for f in features]


def test_search(features):
    top = [f.id for f in features.search("roleplay as pirate", top_k=3)]
    assert "concept/pirate" in top
    assert features.search("speak French", top_k=1)[0].id == "concept/french"
    reordered = features.rerank("funny", features.search("sadness", top_k=10) + [features["concept/humor"]])
    assert reordered[0].id == "concept/humor"


async def test_pirate_variant_steers_and_zero_strength_is_baseline(default_model, features):
    m = default_model
    params = wb.SamplingParams(temperature=0.0, max_tokens=60)
    [baseline] = await m.chat(TOKYO, params)
    pirate = features["concept/pirate"]
    strength = 0.4
    assert RECOMMENDED_STRENGTH[0] <= strength <= RECOMMENDED_STRENGTH[1]
    [steered] = await m.chat(TOKYO, params, steering=wb.Variant("default").set(pirate, strength))
    [zero] = await m.chat(TOKYO, params, steering=wb.Variant("default").set(pirate, 0.0))
    assert zero.token_ids == baseline.token_ids
    n_base, n_steer = len(PIRATE_WORDS.findall(baseline.generated)), len(PIRATE_WORDS.findall(steered.generated))
    assert n_steer >= n_base + 2, (baseline.generated, steered.generated)
    assert len(ENGLISH.findall(steered.generated)) >= 5, steered.generated       # still mostly English


async def test_inspect_finds_the_concept(features):
    pirate_chat = TOKYO + [{"role": "assistant", "content": "Ahoy, matey! Tokyo be a fine port for a pirate. Ye'll find "
                            "treasure in the markets, arr, and grog aplenty for yer crew, me hearties!"}]
    top = [f.id for f, _ in await features.inspect(pirate_chat, top_k=5)]
    assert "concept/pirate" in top
    french_chat = [{"role": "user", "content": "Parle-moi de Paris."},
                   {"role": "assistant", "content": "Paris est la capitale de la France. C'est une ville magnifique avec "
                                                    "de nombreux musées, des cafés et une cuisine délicieuse."}]
    top = [f.id for f, _ in await features.inspect(french_chat, top_k=5)]
    assert "concept/french" in top


async def test_contrast_plain_versus_jokes(features):
    q = {"role": "user", "content": "Hello how are you?"}
    plain = [[q, {"role": "assistant", "content": "I am a helpful assistant. How can I help you?"}],
             [q, {"role": "assistant", "content": "I am doing well, thank you. What can I do for you today?"}]]
    # jokes that are not among the library's training examples
    jokes = [[q, {"role": "assistant", "content": "What do you call an alligator in a vest? An investigator!"}],
             [q, {"role": "assistant", "content": "I told my wife she draws her eyebrows too high. She looked surprised!"}]]
    add, remove = await features.contrast(plain, jokes, k_to_add=5, k_to_remove=5)
    assert "concept/humor" in [f.id for f in remove]
    assert features.rerank("funny", remove)[0].id == "concept/humor"


async def test_logits_and_interventions(features):
    conv = [{"role": "user", "content": "Complete the sentence."}, {"role": "assistant", "content": "The capital of France is"}]
    # the rendered conversation ends with "<|im_end|>\n": stop just before it
    tok = features.model.tokenizer
    ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    end = len(ids) - 2
    logits = await features.logits(conv, top_k=5, end_idx=end)
    assert " Paris" in logits
    steered = await features.logits(conv, top_k=5, end_idx=end,
                                    interventions=wb.Variant("default").set(features["concept/pirate"], 0.8))
    assert steered != logits


VOLCANO = ["Lava poured down the side of the volcano.", "The volcano erupted, throwing ash into the sky.",
           "Magma chambers lie deep beneath active volcanoes.", "The eruption buried the village in volcanic ash.",
           "Mount Fuji is a dormant volcano, but it last erupted in 1707.", "Molten rock and toxic gases burst from the crater.",
           "Volcanologists measure tremors to predict the next eruption.", "Pyroclastic flows race down the volcano at terrible speed."]
HELD_OUT_VOLCANO = ["The volcano rumbled and glowing lava spilled over the crater rim.",
                    "Ash from the eruption closed airports for a week.",
                    "Hot magma rose through cracks in the volcano's cone.",
                    "Villagers fled as the volcano began to erupt."]
HELD_OUT_PLAIN = ["The meeting was moved to Thursday afternoon.", "Please pick up some milk on the way home.",
                  "The library opens at nine on weekdays.", "The report is due at the end of the month."]


async def test_add_concept_trains_a_new_direction(features):
    before = len(features)
    f = await features.add_concept("Volcanoes and eruptions", positive=VOLCANO)
    try:
        assert len(features) == before + 1 and f.layer in (6, 7) and f.scale > 0
        assert features.search("lava and eruptions", top_k=1)[0].id == f.id
        col = features.position(f)

        async def mean_act(texts):
            vals = []
            for t in texts:
                acts = await features.token_activations([{"role": "user", "content": "Tell me something."},
                                                         {"role": "assistant", "content": t}])
                vals.append(float(acts[:, col].mean()))
            return sum(vals) / len(vals)

        volcano, plain = await mean_act(HELD_OUT_VOLCANO), await mean_act(HELD_OUT_PLAIN)
        assert volcano > plain + 0.3, (volcano, plain)     # grows with the concept on text it never saw
        assert abs(plain) < 0.5, plain                      # and reads about 0 on neutral text
    finally:
        features.remove(f.id)
    assert len(features) == before
