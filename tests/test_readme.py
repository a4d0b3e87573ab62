"""The README's method table states the library's real defaults."""

from pathlib import Path

import sspeft
from sspeft.config import METHOD_DEFAULTS

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_rows() -> dict[str, list[str]]:
    text = README.read_text()
    block = text.split("<!-- method-table")[1].split("<!-- /method-table -->")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in sspeft.METHODS:
            rows[cells[0]] = cells
    return rows


def test_method_table_matches_defaults():
    rows = _table_rows()
    assert set(rows) == set(sspeft.METHODS)
    for method, cells in rows.items():
        d = METHOD_DEFAULTS[method]
        _, _, norm, _, init, scaling, n, lr = cells
        assert norm == d["normalization"], method
        assert init == d["init"], method
        assert float(scaling) == d["scaling"], method
        assert int(n) == d["n"], method
        assert float(lr) == d["lr"], method


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
