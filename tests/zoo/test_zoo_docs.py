"""docs/models.md's supported-models table is the zoo registry's, verbatim."""

from pathlib import Path

from .models import ZOO, table

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_models_doc_table_matches_the_zoo():
    text = DOC.read_text()
    start, end = "<!-- zoo-table-start -->\n", "\n<!-- zoo-table-end -->"
    assert start in text and end in text, "docs/models.md lost its table markers"
    documented = text[text.index(start) + len(start):text.index(end)]
    assert documented == table(), "regenerate the table with: python -m tests.zoo.models"
    for model in ZOO:
        assert f"`{model.name}`" in documented
