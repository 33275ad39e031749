"""Copy the results the commands wrote into the README and the evidence page, so their
numbers are generated, never retyped.

    python -m modeconn.training.readme_results [--readme README.md] [--evidence docs/evidence.md]
        [--demo runs/demo/summary.md] [--compare runs/demo/compare/compare.md]
        [--compare-standard runs/standard/compare/compare.md] [--compare-digits runs/digits/compare/compare.md]

Each results file replaces what lies between its pair of marker comments in its page:
`<!-- results:demo -->` ... `<!-- /results:demo -->` in the README (the pipeline's summary.md)
and `<!-- results:compare -->` ... `<!-- /results:compare -->` in the evidence page (compare's
compare.md on the demo; `compare-standard` and `compare-digits`: the same table on the published
MNIST-1D and on the digits image folder); the rest of each page is left byte for byte. Both files state their machine, date, test-set size
and intervals (training/core/provenance.py), so the copy carries them. A section whose file is
not given is left as it is; a missing file or marker is an error naming it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from modeconn.contract.errors import ModeconnError
from modeconn.training.core.checkpoint import atomic_write_bytes, atomic_write_text

SECTIONS = ("demo", "compare", "compare-standard", "compare-digits")
DEFAULTS = {"demo": Path("runs/demo/summary.md"), "compare": Path("runs/demo/compare/compare.md"),
            "compare-standard": Path("runs/standard/compare/compare.md"),
            "compare-digits": Path("runs/digits/compare/compare.md")}
# which page holds each section's markers
PAGES = {"demo": "readme", "compare": "evidence", "compare-standard": "evidence", "compare-digits": "evidence"}
# the docs' pictures, regenerated from a demo run folder (`--images runs/demo`)
IMAGES = {"curve.png": Path("curve/curve.png"), "fge.png": Path("fge/fge.png")}


def copy_images(runs: Path, images: Path) -> list[Path]:
    """The demo's plots into the docs' image folder; a missing plot is an error naming it."""
    missing = [runs / rel for rel in IMAGES.values() if not (runs / rel).is_file()]
    if missing:
        raise ReadmeError(f"plot {missing[0]} does not exist; run `modeconn pipeline` first")
    written = []
    for name, rel in IMAGES.items():
        atomic_write_bytes(images / name, (runs / rel).read_bytes())
        written.append(images / name)
    return written


class ReadmeError(ModeconnError):
    """A results file or README marker that is missing or malformed."""


def markers(section: str) -> tuple[str, str]:
    return f"<!-- results:{section} -->", f"<!-- /results:{section} -->"


def replace_section(readme: str, section: str, content: str, where: str = "README") -> str:
    """`readme` with the text between the section's markers replaced by `content`."""
    begin, end = markers(section)
    found = [(m.start(), m.end()) for m in re.finditer(re.escape(begin), readme)]
    closing = [(m.start(), m.end()) for m in re.finditer(re.escape(end), readme)]
    if len(found) != 1 or len(closing) != 1:
        raise ReadmeError(f"{where} must hold exactly one {begin} and one {end} (found {len(found)} and {len(closing)})")
    (_, open_end), (close_start, _) = found[0], closing[0]
    if close_start < open_end:
        raise ReadmeError(f"{where}: {end} comes before {begin}")
    return readme[:open_end] + "\n" + content.strip("\n") + "\n" + readme[close_start:]


def update_readme(readme: Path, files: dict[str, Path]) -> list[str]:
    """Replace each given section of `readme` with its file; returns the sections updated."""
    if not readme.is_file():
        raise ReadmeError(f"README {readme} does not exist")
    text = readme.read_text()
    for section, path in files.items():
        if not path.is_file():
            raise ReadmeError(f"results file {path} (section {section}) does not exist; run the command that writes it")
        text = replace_section(text, section, path.read_text(), where=str(readme))
    atomic_write_text(readme, text)
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeconn.training.readme_results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--evidence", type=Path, default=Path("docs/evidence.md"))
    parser.add_argument("--images", type=Path, metavar="RUNS", help="copy the demo run's curve and FGE plots "
                        "into docs/images (RUNS: the pipeline's run folder, e.g. runs/demo)")
    for section in SECTIONS:
        parser.add_argument(f"--{section}", type=Path, help=f"results file (default {DEFAULTS[section]} when it exists)")
    args = parser.parse_args(argv)
    given = {s: getattr(args, s.replace("-", "_")) for s in SECTIONS if getattr(args, s.replace("-", "_")) is not None}
    # without arguments: every default file that exists (a section not run yet stays as it is)
    files = given or {s: p for s, p in DEFAULTS.items() if p.is_file()}
    try:
        if args.images is not None:
            for path in copy_images(args.images, args.evidence.parent / "images"):
                print(f"{path} <- {args.images}", file=sys.stderr)
            if not given:
                return 0
        if not files:
            raise ReadmeError(f"no results files: none of {', '.join(map(str, DEFAULTS.values()))} exists")
        for section, path in files.items():
            page = getattr(args, PAGES[section])
            update_readme(page, {section: path})
            print(f"{page}: section {section} <- {path}", file=sys.stderr)
    except ModeconnError as err:
        print(f"readme_results: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
