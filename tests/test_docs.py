from pqflow.recipe_doc import render_reference

from .conftest import REPO


def test_recipe_reference_is_current():
    """docs/recipe.md is generated; regenerate with `pqflow recipe-doc > docs/recipe.md`."""
    assert (REPO / "docs" / "recipe.md").read_text() == render_reference()


def test_readme_family_table_is_current():
    """README's family table is generated; regenerate with `pqflow families`."""
    from pqflow.family_support import support_table

    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- families:start -->\n", 1)[1].split("<!-- families:end -->", 1)[0]
    assert table == support_table()
