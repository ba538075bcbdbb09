"""The README's results are traceable: every number in a block marked `<!-- numbers: studies/<study> -->` ...
`<!-- /numbers -->` is found, at the precision the README writes it, in that study's committed results.md or
CSVs, and every figure the README shows is a committed file; the claims table is the combined report's
verdicts.md. A rerun that changes a number or a verdict fails here until the README follows."""
import csv
import os
import re

from conftest import ROOT

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
BLOCK = re.compile(r"<!-- numbers: (\S+) -->(.*?)<!-- /numbers -->", re.S)


def committed_numbers(study):
    """Every number in a study's results.md and CSVs, as floats."""
    found = set()
    for name in os.listdir(study):
        if name.endswith((".md", ".csv", ".tsv")):
            with open(os.path.join(study, name)) as f:
                text = f.read()
            if name.endswith(".csv"):  # cells such as '[0.03, 0.17]' are text; numbers in any cell count
                text = " ".join(" ".join(row) for row in csv.reader(text.splitlines()))
            found |= {float(x) for x in NUMBER.findall(text.replace("[", " ").replace("]", " "))}
    return found


def untraced(block, numbers):
    """The README's numbers in block that no committed number rounds to (at the README's decimals)."""
    missing = []
    for token in NUMBER.findall(block.replace("[", " ").replace("]", " ").replace("/", " ")):
        decimals = len(token.split(".")[1]) if "." in token else 0
        value = float(token)
        if not any(abs(round(n, decimals) - value) < 1e-9 for n in numbers):
            missing.append(token)
    return missing


def test_every_marked_number_is_in_its_study_and_every_figure_is_committed():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = BLOCK.findall(readme)
    assert blocks, "no <!-- numbers: ... --> block in README.md"
    for study, block in blocks:
        folder = os.path.join(ROOT, study)
        assert os.path.isfile(os.path.join(folder, "results.md")), f"{study}/results.md is not there"
        missing = untraced(block, committed_numbers(folder))
        assert not missing, f"README numbers not in {study}: {missing}"
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert os.path.isfile(os.path.join(ROOT, path)), f"README shows {path}, which is not committed"


def test_the_claims_table_is_the_combined_reports_verdicts():
    """The README's claims table is studies/claims/verdicts.md as report.py --combine last wrote it."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"<!-- verdicts: (\S+) -->\n(.*?)<!-- /verdicts -->", readme, re.S)
    assert len(blocks) == 1, "README.md needs one <!-- verdicts: FILE --> block"
    path, table = blocks[0]
    with open(os.path.join(ROOT, path)) as f:
        assert table == f.read(), f"README's claims table differs from {path}: paste it again"


def test_the_check_fails_on_a_number_a_rerun_changed(tmp_path):
    (tmp_path / "results.md").write_text("| k=0 | 6/64 | 0.09 [0.03, 0.17] |\n")
    numbers = committed_numbers(str(tmp_path))
    assert untraced("k=0: 6/64 = 0.09 [0.03, 0.17]", numbers) == []
    assert untraced("k=0: 6/64 = 0.11 [0.03, 0.17]", numbers) == ["0.11"]
