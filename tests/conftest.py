import pytest

from backprop_ninja import data


@pytest.fixture(scope="session")
def words():
    """The course's words (whatever data/names.txt holds: canonical or the fallback)."""
    return data.load_words()


@pytest.fixture(scope="session")
def canonical_words(words):
    """The lecture's names.txt; checks that need its exact figures skip on other data."""
    if not data.is_canonical():
        pytest.skip("data/names.txt is not the lecture's names.txt (offline fallback?): "
                    "the lecture's exact figures do not apply")
    return words
