"""training/readme_results.py on a temporary README and evidence page (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeconn.training.readme_results import main, replace_section

README = """# project

intro text, kept byte for byte

<!-- results:demo -->
old demo numbers, typed by hand
<!-- /results:demo -->

middle text

<!-- results:compare -->
<!-- /results:compare -->
tail
"""


def test_sections_are_replaced_and_the_rest_is_kept(tmp_path: Path) -> None:
    readme, demo, compare = tmp_path / "README.md", tmp_path / "summary.md", tmp_path / "compare.md"
    readme.write_text(README)
    demo.write_text("| model | error |\n|---|---|\n| FGE | 1.00 [-0.50, +0.20] |\n")
    compare.write_text("\n\nbudget table\n")
    pages = ["--readme", str(readme), "--evidence", str(readme)]  # one file holding both sections
    assert main([*pages, "--demo", str(demo), "--compare", str(compare)]) == 0
    text = readme.read_text()
    assert text == README.replace("old demo numbers, typed by hand\n", demo.read_text()).replace(
        "<!-- results:compare -->\n", "<!-- results:compare -->\nbudget table\n")
    assert "typed by hand" not in text
    assert main([*pages, "--demo", str(demo), "--compare", str(compare)]) == 0
    assert readme.read_text() == text  # idempotent
    compare.write_text("new table\n")
    assert main([*pages, "--compare", str(compare)]) == 0  # only that section changes
    assert readme.read_text() == text.replace("budget table", "new table")


def test_missing_markers_and_files_are_errors_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    readme, demo = tmp_path / "README.md", tmp_path / "summary.md"
    demo.write_text("numbers\n")
    readme.write_text("# no markers here\n")
    assert main(["--readme", str(readme), "--demo", str(demo)]) == 2
    err = capsys.readouterr().err
    assert str(readme) in err and "<!-- results:demo -->" in err and len(err.strip().splitlines()) == 1
    assert readme.read_text() == "# no markers here\n"  # untouched
    readme.write_text(README)
    missing = tmp_path / "nope.md"
    assert main(["--readme", str(readme), "--demo", str(missing)]) == 2
    assert f"results file {missing}" in capsys.readouterr().err
    assert readme.read_text() == README
    with pytest.raises(Exception, match="exactly one"):
        replace_section(README + "<!-- results:demo -->\n", "demo", "x")
    with pytest.raises(Exception, match="comes before"):
        replace_section("<!-- /results:demo -->\n<!-- results:demo -->\n", "demo", "x")



def test_each_section_goes_to_its_own_page(tmp_path: Path) -> None:
    readme, evidence = tmp_path / "README.md", tmp_path / "evidence.md"
    readme.write_text("a\n<!-- results:demo -->\n<!-- /results:demo -->\n")
    evidence.write_text("b\n<!-- results:compare -->\n<!-- /results:compare -->\n")
    demo, compare = tmp_path / "summary.md", tmp_path / "compare.md"
    demo.write_text("demo table\n")
    compare.write_text("budget table\n")
    assert main(["--readme", str(readme), "--evidence", str(evidence), "--demo", str(demo), "--compare", str(compare)]) == 0
    assert readme.read_text() == "a\n<!-- results:demo -->\ndemo table\n<!-- /results:demo -->\n"
    assert evidence.read_text() == "b\n<!-- results:compare -->\nbudget table\n<!-- /results:compare -->\n"
    # the other data sets' tables: their own sections of the evidence page, the demo's left as it is
    evidence.write_text(evidence.read_text() + "<!-- results:compare-standard -->\n<!-- /results:compare-standard -->\n"
                        "<!-- results:compare-digits -->\nold\n<!-- /results:compare-digits -->\n")
    standard, digits = tmp_path / "standard.md", tmp_path / "digits.md"
    standard.write_text("standard table\n")
    digits.write_text("digits table\n")
    assert main(["--evidence", str(evidence), "--compare-standard", str(standard), "--compare-digits", str(digits)]) == 0
    assert evidence.read_text() == ("b\n<!-- results:compare -->\nbudget table\n<!-- /results:compare -->\n"
                                    "<!-- results:compare-standard -->\nstandard table\n<!-- /results:compare-standard -->\n"
                                    "<!-- results:compare-digits -->\ndigits table\n<!-- /results:compare-digits -->\n")


def test_the_shipped_pages_hold_their_markers() -> None:
    root = Path(__file__).resolve().parents[1]
    evidence = root / "docs" / "evidence.md"
    for section, page in (("demo", root / "README.md"), ("compare", evidence), ("compare-standard", evidence),
                          ("compare-digits", evidence)):
        text = page.read_text()
        assert text.count(f"<!-- results:{section} -->") == 1 and text.count(f"<!-- /results:{section} -->") == 1


def test_images_are_copied_from_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    (docs / "images").mkdir(parents=True)
    evidence = docs / "evidence.md"
    assert main(["--evidence", str(evidence), "--images", str(runs)]) == 2
    assert "curve.png" in capsys.readouterr().err and not any((docs / "images").iterdir())
    for rel, payload in (("curve/curve.png", b"curve"), ("fge/fge.png", b"fge")):
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_bytes(payload)
    assert main(["--evidence", str(evidence), "--images", str(runs)]) == 0
    assert (docs / "images" / "curve.png").read_bytes() == b"curve"
    assert (docs / "images" / "fge.png").read_bytes() == b"fge"
