from pqflow.recipe_doc import render_reference

from .conftest import REPO


def test_recipe_reference_is_current():
    """docs/recipe.md is generated; regenerate with `pqflow recipe-doc > docs/recipe.md`."""
    assert (REPO / "docs" / "recipe.md").read_text() == render_reference()
