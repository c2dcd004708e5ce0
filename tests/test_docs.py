"""The docs against the code: every citation is in docs/paper.md's map, nothing points outside
the repository, the preset tables are the presets', and every documented command passes its
script's flag checks.

Run:   python -m pytest -q tests/test_docs.py
Print docs/paper.md's preset tables from the presets:   python tests/test_docs.py
"""
import ast
import glob
import io
import json
import os
import re

import pytest

from helpers import HERE  # (it puts the repository's root on sys.path)
import trainer


# --- the paper map: every citation checked against docs/paper.md ------------------------------

_REF = r"(?:§\s?\d+(?:\.\d+)*(?:[–-]\d+(?:\.\d+)*)?|Eqs?\.\s?\(?\d+\)?(?:[–-]\(?\d+\)?)?|Alg(?:orithm)?\.?\s?\d+|App\.\s?[A-Z]|Fig\.\s?\d+|Figure\s\d+|Table\s\d+|appendix)"
CITATION = re.compile(r"\b(CDM|DDPM|iDDPM|ADM|DDIM|SR3|PD|DPM\+\+|EDM)(?:'s)?\s(" + _REF
                      + r"(?:(?:,\s|\sand\s|;\s)" + _REF + r")*)")


def citations_in(text):
    """Every citation in `text`, one normalised key each: 'CDM §3.1', 'DDPM Eq. (4)', 'EDM Alg. 1',
    'CDM Fig. 1', 'CDM appendix'. A range ('§3.1-3.3', 'Eqs. (6)-(7)') gives each of its members."""
    keys = []
    for m in CITATION.finditer(text):
        paper = m.group(1)
        for ref in re.findall(_REF, m.group(2)):
            ref = ref.replace(" ", "")
            if ref.startswith("§"):
                lo, _, hi = ref[1:].replace("–", "-").partition("-")
                if hi:                                    # §3.1-3.3 or §3.1-3: 3.1, 3.2, 3.3
                    head = lo.rsplit(".", 1)[0] + "." if "." in lo else ""
                    a, b = int(lo.rsplit(".", 1)[-1]), int(hi.rsplit(".", 1)[-1])
                    keys += [f"{paper} §{head}{i}" for i in range(a, b + 1)]
                else:
                    keys.append(f"{paper} §{lo}")
            elif ref.startswith("Eq"):
                nums = re.findall(r"\d+", ref)
                nums = range(int(nums[0]), int(nums[-1]) + 1) if len(nums) == 2 else map(int, nums)
                keys += [f"{paper} Eq. ({n})" for n in nums]
            elif ref.startswith("Alg"):
                keys.append(f"{paper} Alg. {re.findall(r'[0-9]+', ref)[0]}")
            elif ref.startswith(("Fig", "Figure")):
                keys.append(f"{paper} Fig. {re.findall(r'[0-9]+', ref)[0]}")
            elif ref.startswith("Table"):
                keys.append(f"{paper} Table {ref[5:]}")
            elif ref.startswith("App."):
                keys.append(f"{paper} App. {ref[4:]}")
            else:
                keys.append(f"{paper} appendix")
    return keys


def repository_texts():
    """(name, text) of every file a reader reads: the code, the tests, the docs and the notebook's
    cells."""
    names = sorted(f for f in os.listdir(HERE) if f.endswith((".py", ".md")))
    names += sorted("tests/" + f for f in os.listdir(os.path.join(HERE, "tests")) if f.endswith(".py"))
    names += sorted("docs/" + f for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md"))
    names += [".ci/" + f for f in sorted(os.listdir(os.path.join(HERE, ".ci")))]
    texts = [(n, open(os.path.join(HERE, n), encoding="utf-8").read()) for n in names]
    nb = json.load(open(os.path.join(HERE, "notebook.ipynb"), encoding="utf-8"))
    texts += [(f"notebook.ipynb cell {i}", "".join(c["source"])) for i, c in enumerate(nb["cells"])]
    return texts


def paper_map_keys():
    """The citations docs/paper.md lists: the first cell of its table rows, `in backticks`."""
    text = open(os.path.join(HERE, "docs", "paper.md"), encoding="utf-8").read()
    return {k for cell in re.findall(r"^\| `([^`]+)` \|", text, re.M) for k in citations_in(cell)}


def suite_test_names():
    """The name of every test of the suite: test_cdm.py's and tests/test_*.py's."""
    names = set()
    for path in [os.path.join(HERE, "test_cdm.py"), *sorted(glob.glob(os.path.join(HERE, "tests", "test_*.py")))]:
        tree = ast.parse(open(path, encoding="utf-8").read())
        names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return names


def test_every_citation_is_in_the_paper_map():
    """Every 'CDM §...', 'CDM Fig. ...', 'DDPM Eq. (...)', ... in the code, the docs and the notebook
    is a row of docs/paper.md, where its title and what it says were checked. The collector
    itself is checked first on citations planted here (built at run time, so that this file's
    text holds none of them)."""
    known = paper_map_keys()
    assert {"CDM §3", "CDM §3.1", "CDM §3.2", "CDM §3.3", "CDM §4.1", "CDM Fig. 1", "DDPM Eq. (4)",
            "iDDPM Eq. (17)", "DPM++ Alg. 2"} <= known
    cdm_ = "CDM"
    planted = f"the cascade ({cdm_} §3.7), blur ({cdm_} §3.1-3.2), ({cdm_} Table 4); DDPM Eqs. (6)-(7)"
    assert citations_in(planted) == [f"{cdm_} §3.7", f"{cdm_} §3.1", f"{cdm_} §3.2", f"{cdm_} Table 4",
                                     "DDPM Eq. (6)", "DDPM Eq. (7)"]
    assert [k for k in citations_in(planted) if k not in known] == [f"{cdm_} §3.7", f"{cdm_} Table 4"]
    unknown = [(name, key) for name, text in repository_texts() for key in citations_in(text)
               if key not in known]
    assert not unknown, f"citations that docs/paper.md does not list: {unknown}"


def test_the_repository_refers_to_nothing_outside_it():
    """No file points at notes a reader of the repository does not have, every relative link in
    the docs leads to a file that exists, and every test docs/paper.md names exists."""
    texts = repository_texts()
    # the names are put together here so that this file does not contain them either
    names = ["paper" + "-notes", "../" + "shared", "shared" + "/style"]
    outside = [(n, w) for n, t in texts for w in names if w in t]
    assert not outside, outside
    for name, text in texts:
        if name.endswith(".md"):
            folder = os.path.dirname(os.path.join(HERE, name))
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
                assert os.path.exists(os.path.join(folder, target)), f"{name} links to {target}"
    named = set(re.findall(r"`(test_\w+)`", open(os.path.join(HERE, "docs", "paper.md"), encoding="utf-8").read()))
    tests = suite_test_names()
    assert named and named <= tests, named - tests


# --- the preset tables of docs/paper.md -------------------------------------------------------

def preset_tables():
    """The preset tables docs/paper.md shows, made from the presets themselves."""
    import train_base
    import train_sr
    return ("**train_base.py** (`--preset`)\n\n" + trainer.preset_table(train_base.PRESETS)
            + "\n\n**train_sr.py** (`--preset`; `s_max_frac` and `sample_s_frac` are fractions of `aug_T`, "
            "giving `--s_max` and `--sample_s`)\n\n" + trainer.preset_table(train_sr.PRESETS))


def test_the_preset_tables_show_every_value_and_its_source():
    """Each preset gives a source for every value it sets, from the known kinds; docs/paper.md's
    tables are exactly those of the code; the paper presets take no value of ours that the paper
    settles (their resolutions, augmentation types and blur share are the paper's)."""
    import train_base
    import train_sr
    doc = open(os.path.join(HERE, "docs", "paper.md"), encoding="utf-8").read()
    assert preset_tables() in doc, "docs/paper.md's preset tables are stale: paste what `python tests/test_docs.py` prints"
    for script in (train_base, train_sr):
        for name, d in script.PRESETS.items():
            values = {k for k in d if k != "sources"}
            assert values == set(d["sources"]), name
            assert set(d["sources"].values()) <= set(trainer.SOURCE_NAMES.values()), name
            if name.startswith("imagenet"):
                assert {d["sources"][k] for k in ("res",)} == {"paper"}
    sr = train_sr.PRESETS
    assert all(sr[n]["sources"][k] == "paper" for n in ("imagenet64", "imagenet128", "imagenet256")
               for k in ("low_res", "aug"))
    # imagenet64's s: trained on a range holding the best s reported for the paper (751-1251 of
    # 4000, non-truncated), and sampled inside it
    d = sr["imagenet64"]
    assert d["aug_T"] * d["s_max_frac"] >= 1251 and 751 <= d["aug_T"] * d["sample_s_frac"] <= 1251
    assert train_base.PRESETS["imagenet32"]["sample_steps"] == 4000 == d["sample_steps"]   # all steps


# --- the commands of README.md and docs/ ------------------------------------------------------

def test_every_documented_command_passes_its_scripts_flag_checks():
    """Each `python` / `torchrun` command of train_base.py, train_sr.py, sample.py, bench.py and distill.py
    in README.md and docs/*.md passes the script's own checks of its flags (parse_args: for the
    training scripts every range and the U-Net's shape; nothing is trained). A new check must not
    break a documented command: `train_base.py --res 16`, the README's own-folder command, was
    once refused for the demo base's attention at 4 pixels."""
    import contextlib
    import glob
    import importlib
    import shlex
    found = []
    for path in ["README.md", *sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))]:
        text = open(os.path.join(HERE, path)).read().replace("\\\n", " ")
        for m in re.finditer(r"(?:python3?|torchrun(?: --[\w-]+(?: \d+)?)*) (train_base|train_sr|sample|bench|distill)"
                             r"\.py((?: [^\s`&|;)#]+)*)", text):
            found.append((path, m.group(1), shlex.split(m.group(2))))
    assert ("README.md", "train_base", "--data data/glyphs --res 16 --steps 2000 --out runs/glyphs/base".split()) in found
    assert len(found) >= 15, found
    for path, script, argv in found:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                importlib.import_module(script).parse_args(argv)
        except SystemExit as e:
            said = f"{e.code if isinstance(e.code, str) else ''}{err.getvalue()}"
            if "no such" not in said:              # a folder of the reader's, not here: fine
                pytest.fail(f"{path}: {script}.py {' '.join(argv)}: {said}")


if __name__ == "__main__":
    print(preset_tables())
