"""The assignment kit (assign.py, grading.py, sandbox.py): references, stubs and wrong answers
graded as they should be, and a grader that hostile code cannot fool. The kit is not copied for
students, so in their copy these tests skip.

Run:   python -m pytest -q tests/test_kit.py
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import HERE  # (it puts the repository's root on sys.path)
import cdm
import test_cdm  # noqa: E402  (each unit's tests are its functions)


def _parameter_cases(fn):
    """The keyword arguments of each case of a test, from its @pytest.mark.parametrize marks."""
    cases = [{}]
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        values = [v.values if hasattr(v, "values") else v for v in mark.args[1]]
        cases = [{**case, **dict(zip(names, v if len(names) > 1 else (v,)))} for case in cases for v in values]
    return cases


def module_from(source):
    """A fresh module made of cdm.py's text `source` (registered while it is executed, for the
    dataclass in it)."""
    import types
    module = types.ModuleType("_cdm_graded")
    module.__file__ = os.path.join(HERE, "cdm.py")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, "cdm.py", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def unit_results(source, unit, stop_at_first=False):
    """{test name: passed} of `unit`'s tests (test_cdm.py's) run in this process against a cdm
    module built from `source` (the tests look `cdm` up among test_cdm's globals, swapped
    meanwhile): grading without a process per test, for the checks below."""
    module, saved, results = module_from(source), test_cdm.cdm, {}
    test_cdm.cdm = module
    try:
        for name in unit.tests:
            fn = getattr(test_cdm, name)
            ok = True
            for kwargs in _parameter_cases(fn):
                try:
                    fn(**kwargs)
                except (Exception, pytest.fail.Exception):
                    ok = False
                    break
            results[name] = ok
            if stop_at_first and not ok:
                break
    finally:
        test_cdm.cdm = saved
    return results


def reference_source():
    return open(os.path.join(HERE, "cdm.py"), encoding="utf-8").read()


def test_the_kit_covers_the_paper_and_the_reference_scores_full_marks():
    """Every unit has its functions, its students' tests, two or more wrong answers and grading
    cases; the reference passes its tests and agrees with itself on every case, for any seed."""
    kit = pytest.importorskip("assign")
    ref = reference_source()
    assert len(kit.UNITS) >= 12 and len({u.name for u in kit.UNITS}) == len(kit.UNITS)
    for unit in kit.UNITS:
        assert all(kit.function_text(ref, f) for f in unit.functions), unit.name
        assert all(t in vars(test_cdm) for t in unit.tests), unit.name
        assert len(kit.WRONG_ANSWERS[unit.name]) >= 2, unit.name
        assert all(unit_results(ref, unit).values()), unit.name
        for seed in (0, 1):
            passed, total, first = kit.check_in_process(ref, unit, seed)
            assert total >= 3 and passed == total, (unit.name, first)


def test_every_wrong_answer_fails_its_unit_and_docs_teaching_says_which_test():
    """The mistakes students make, each one edit from the reference: every one fails a test of
    its unit (what students run), the grader's cases catch it whatever the secret seed, and
    docs/teaching.md's table names a test that catches it."""
    kit = pytest.importorskip("assign")
    ref = reference_source()
    doc = open(os.path.join(HERE, "docs", "teaching.md"), encoding="utf-8").read()
    rows = {r[0]: r for r in (tuple(c.strip() for c in line.strip("|").split("|")) for line in doc.splitlines()
                              if line.startswith("| ") and line.count("|") == 4)}
    for unit in kit.UNITS:
        for wrong, function, old, new in kit.WRONG_ANSWERS[unit.name]:
            mutated = kit.mutated_source(ref, function, old, new)
            results = unit_results(mutated, unit)
            failed = [t for t, ok in results.items() if not ok]
            assert failed, f"{unit.name}: '{wrong}' passes every test of the unit"
            assert wrong in rows, f"docs/teaching.md does not list '{wrong}'"
            named = re.findall(r"`(test_\w+)`", rows[wrong][2])
            assert named and set(named) <= set(failed), (wrong, named, failed)
            for seed in (0, 1):
                passed, total, _ = kit.check_in_process(mutated, unit, seed)
                assert passed < total, f"{unit.name}: the grader's cases miss '{wrong}' (seed {seed})"


def test_a_stub_scores_zero_on_its_unit_and_a_syntax_error_costs_only_its_units():
    """A blanked unit agrees on no case and raises the exercise's NotImplementedError. A file that
    does not parse is graded unit by unit: each unit's functions cut out of it and put into the
    blank copy (never the reference), so a syntax error costs only the units it is in."""
    kit = pytest.importorskip("assign")
    ref = reference_source()
    blank = kit.stubbed_source(ref, set(kit.UNIT_BY_NAME))
    for unit in kit.UNITS:
        stubbed = kit.stubbed_source(ref, {unit.name})
        assert kit.check_in_process(stubbed, unit)[0] == 0, unit.name
        fn = module_from(stubbed)
        for part in unit.functions[0].split("."):
            fn = getattr(fn, part)
        with pytest.raises(NotImplementedError, match=rf"exercise {kit.UNITS.index(unit) + 1} \({unit.name}\): write"):
            fn(*[None] * fn.__code__.co_argcount)
    broken = ref.replace("    if not truncated:\n", "    if not truncated\n", 1)       # in handover
    for unit in kit.UNITS:
        graded = kit.graded_source(broken, unit.name)
        if unit.name == "handover":
            with pytest.raises(SyntaxError):
                compile(graded, "cdm.py", "exec")
            continue
        other = [f for u in kit.UNITS if u is not unit for f in u.functions]
        assert all(kit.function_text(graded, f) == kit.function_text(blank, f) for f in other), unit.name
        assert kit.check_in_process(graded, unit)[0] == kit.check_in_process(ref, unit)[1], unit.name


def test_the_grader_answers_only_the_calls_a_units_reference_makes():
    """A unit cannot be had from another unit's oracle: while q_sample is graded the grader
    answers no call at all, so a q_sample that hands its work to noise_augment (which the grader
    would answer for the noise_augment unit) scores 0; a request for a function outside the
    unit's list is refused."""
    kit = pytest.importorskip("assign")
    import grading
    ref = reference_source()
    cheat = kit.replace_functions(kit.stubbed_source(ref, {"q_sample", "noise_augment"}), {
        "GaussianDiffusion.q_sample": "    def q_sample(self, x0, t, eps):\n        return noise_augment(x0, t, self, eps)\n"})
    unit = kit.UNIT_BY_NAME["q_sample"]
    assert kit.check_in_process(cheat, unit)[0] == 0
    d = cdm.GaussianDiffusion(cdm.cosine_schedule(10))
    asked = {"type": "oracle", "fn": "noise_augment", "args": [torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long), d],
             "kwargs": {}}
    with pytest.raises(PermissionError, match="not answered while grading q_sample"):
        grading.answer(cdm, "q_sample", asked)
    assert torch.equal(grading.answer(cdm, "handover", asked), torch.zeros(1, 3, 2, 2))


# --- make and grade, as a teacher runs them ---------------------------------------------------

def kit_run(*args, timeout=600, env=None, cwd=None):
    """assign.py in its own process, as a teacher runs it."""
    return subprocess.run([sys.executable, os.path.join(HERE, "assign.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def graded_scores(results_json):
    return {t["name"].split(" ")[1]: t for t in json.loads(open(results_json).read())["tests"]}


def test_make_then_grade_a_students_copy_end_to_end(tmp_path):
    """`assign.py make` blanks every unit, leaks no reference line, writes ASSIGNMENT.md and the
    Gradescope bundle beside the copy (not in it), and the copy still runs what calls no blanked
    unit; a 'student' then answers: most units right, one wrong, one endlessly looping, one with
    a syntax error, one left blank; `assign.py grade`, with pytest not importable, gives each
    exactly its due and writes Gradescope's results.json."""
    kit = pytest.importorskip("assign")
    ref = reference_source()
    copy, chosen = tmp_path / "hw", ["schedules", "q_sample", "posterior", "blur", "handover", "conditioning"]
    p = kit_run("make", "--units", ",".join(chosen), "--out", copy, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not (copy / "assign.py").exists() and (copy / "test_cdm.py").exists()
    assert (tmp_path / "hw-autograder.zip").exists() and not list(copy.glob("*.zip"))
    assert kit.leaks(str(copy), ref, set(chosen)) == []
    again = kit_run("make", "--units", "blur", "--out", tmp_path / "hw", cwd=tmp_path, timeout=120)
    assert again.returncode == 1 and again.stderr.startswith("error:")
    text = (copy / "ASSIGNMENT.md").read_text()
    for k, unit in enumerate(kit.UNITS, 1):
        assert (f"## Exercise {k}: {unit.name}" in text) == (unit.name in chosen)
        assert (kit.check_command(unit) in text) == (unit.name in chosen)
    assert json.loads((copy / "assignment.json").read_text())["units"] == chosen
    assert "return variance, coef_x0, coef_xt" not in (copy / "cdm.py").read_text()
    run_in_copy = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              cwd=copy, timeout=120)
    blank = run_in_copy("import cdm; cdm.cosine_schedule(10)")
    assert blank.returncode != 0 and "exercise 1 (schedules): write cosine_schedule" in blank.stderr
    fine = run_in_copy("import cdm, data, torch; x = data.load_dataset('shapes', 8, n=16).x; "
                       "print(cdm.downsample(data.to_float(x), 4).shape, cdm.timestep_embedding(torch.tensor([3]), 8).shape)")
    assert fine.returncode == 0 and "torch.Size([16, 3, 4, 4])" in fine.stdout, fine.stderr
    # The student's answers: right for schedules and conditioning, one wrong answer (posterior),
    # an endless loop (q_sample), a syntax error (handover), blur left blank.
    answers = {f: kit.function_text(ref, f) for u in kit.UNITS for f in u.functions if u.name in chosen}
    wrong, function, old, new = kit.WRONG_ANSWERS["posterior"][0]
    answers[function] = kit.function_text(kit.mutated_source(ref, function, old, new), function)
    answers["GaussianDiffusion.q_sample"] = answers["GaussianDiffusion.q_sample"].replace(
        '        return self._at("alphas_cumprod"', "        while True:\n            pass\n        return self._at(\"alphas_cumprod\"", 1)
    answers["handover"] = answers["handover"].replace("if not truncated:", "if not truncated", 1)   # syntax
    for f in kit.UNIT_BY_NAME["blur"].functions:
        del answers[f]                                                 # left blank
    student = kit.replace_functions((copy / "cdm.py").read_text(), {f: t for f, t in answers.items()
                                                                    if f != "handover"})
    student = student.replace(kit.function_text(student, "handover"), answers["handover"])
    (copy / "cdm.py").write_text(student)
    code = ("import sys; sys.modules['pytest'] = None; sys.argv[0] = 'assign.py'; "
            f"sys.path.insert(0, {HERE!r}); import assign, safety; "
            f"safety.run_script(lambda: assign.main(['grade', {str(copy)!r}, '--timeout', '6']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    got = graded_scores(copy / "results.json")
    assert set(got) == set(chosen)                            # the units the copy was made with
    for unit in (kit.UNIT_BY_NAME[n] for n in chosen):
        score = got[unit.name]["score"]
        assert got[unit.name]["max_score"] == unit.points
        if unit.name in ("q_sample", "handover", "blur"):
            assert score == 0, (unit.name, got[unit.name]["output"][-500:])
        elif unit.name == "posterior":
            assert 0 <= score < unit.points
        else:
            assert score == unit.points, (unit.name, got[unit.name]["output"][-800:])
    assert "timed out" in got["q_sample"]["output"]
    assert "NotImplementedError" in got["blur"]["output"]
    assert "SyntaxError" in got["handover"]["output"]
    assert json.loads((copy / "results.json").read_text())["score"] == sum(t["score"] for t in got.values())
    assert "total" in p.stdout and "posterior" in p.stdout


# --- a hostile submission, and a grader that is killed or cannot grade ------------------------

def _kit_confines_here():
    import sandbox
    layers = sandbox.protections()
    return layers["landlock"] or layers["user"]


def _processes_with(token):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


CHEATS = r"""

# ---- what a hostile student adds --------------------------------------------------------------
import os as _os, signal as _signal, sys as _sys
import numpy as _np, torch as _torch
_np.allclose = _np.isclose = _np.array_equal = lambda *a, **k: True      # patched comparisons
_torch.allclose = _torch.equal = lambda *a, **k: True
try:
    import pytest as _pytest
    _pytest.approx = lambda *a, **k: a[0]
except Exception:
    pass
print("PASSED 16/16 -- every test passed")                               # a fake report


def cosine_schedule(T, offset=0.008, max_beta=0.999):
    for name in ("results.json", "report.xml", "../results.json"):      # a fake verdict on disk
        try:
            open(name, "w").write('{"score": 16, "tests": []}')
        except OSError:
            pass
    return _np.zeros(T + 1)


def linear_schedule(T, beta_1=1e-4, beta_T=0.02):
    _os._exit(126)                            # the status of a sandbox that could not start


def posterior_coefficients(betas):
    _os.kill(_os.getpid(), _signal.SIGKILL)                              # kills its own process


def gaussian_kernel3(sigma):
    return _np.ones(2 ** 30)                                             # 8 GB: past its memory limit


def blur_augment(z, sigma_range=(0.4, 0.6), p=0.5, u=None):
    try:
        print("LEAK", open(REFERENCE).read(200))                         # reads the reference
    except OSError:
        pass
    try:
        _os.remove(VICTIM)                                                 # deletes outside its folder
        print("DELETED", VICTIM)
    except OSError:
        pass
    if _os.fork() == 0:                                                  # a daemon that outlives it
        _os.setsid()
        if _os.fork() == 0:
            _os.execv("/bin/sleep", ["/bin/sleep", TOKEN])
        _os._exit(0)
    return z, _torch.zeros(len(z), dtype=_torch.bool)


if _os.environ.get("NOT_A_REAL_VARIABLE") is None and __name__ == "cdm":
    if _os.fork() == 0:                       # a child that holds every pipe it inherited, forever
        import time as _time
        _time.sleep(3600)
        _os._exit(0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grader confines student code with Linux features")
def test_cheats_score_zero_and_leave_nothing_behind(tmp_path):
    """A submission that plays every trick: a conftest.py and look-alike torch/numpy/pytest
    modules beside it, comparisons patched at import, a fake report printed and written, a
    unit that exits early, one that kills its own process, one that deletes a file outside its
    folder, reads the reference and forks a daemon, and a child that holds the output pipe.
    Each of those units scores 0; the one unit it really answers (handover) gets its point and
    no timeout; nothing it started is running afterwards, no scratch folder is left, the
    victim file and the kit are untouched."""
    kit = pytest.importorskip("assign")
    ref = reference_source()
    hw, scratch_tmp = tmp_path / "hw", tmp_path / "tmp"
    scratch_tmp.mkdir()
    p = kit_run("make", "--units", "schedules,q_sample,posterior,blur,handover", "--out", hw, timeout=120)
    assert p.returncode == 0, p.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    victim.chmod(0o666)
    token = str(900000 + os.getpid() % 99999)
    student = kit.replace_functions((hw / "cdm.py").read_text(), {"handover": kit.function_text(ref, "handover")})
    q = kit.function_text(student, "GaussianDiffusion.q_sample")
    student = student.replace(q, q.split('        raise NotImplementedError')[0] + "        import os; os._exit(0)\n")
    student += CHEATS.replace("VICTIM", repr(str(victim))).replace("REFERENCE", repr(os.path.join(HERE, "cdm.py"))) \
                     .replace("TOKEN", repr(token))
    (hw / "cdm.py").write_text(student)
    (hw / "conftest.py").write_text("import pytest\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
                                    "    out = yield\n    out.get_result().outcome = 'passed'\n")
    for fake in ("numpy.py", "torch.py", "pytest.py", "grading.py", "sitecustomize.py"):
        (hw / fake).write_text("raise SystemExit('the student folder was imported')\n")
    kit_before = {n: hashlib.sha256(open(os.path.join(HERE, n), "rb").read()).hexdigest() for n in kit.KIT_FILES}
    env = {**os.environ, "TMPDIR": str(scratch_tmp)}
    p = kit_run("grade", hw, "--timeout", "60", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    got = graded_scores(hw / "results.json")
    for name in ("schedules", "q_sample", "posterior", "blur"):
        assert got[name]["score"] == 0, (name, got[name]["output"])
    assert got["handover"]["score"] == 1, got["handover"]["output"]
    assert "timed out" not in json.dumps(got) and "MemoryError" in got["blur"]["output"]
    time.sleep(0.5)
    assert _processes_with(token) == [] and _processes_with(str(scratch_tmp)) == []
    assert list(scratch_tmp.iterdir()) == []
    assert kit_before == {n: hashlib.sha256(open(os.path.join(HERE, n), "rb").read()).hexdigest() for n in kit.KIT_FILES}
    if _kit_confines_here():
        assert victim.read_text() == "mine"
        assert "LEAK" not in json.dumps(got) and "could not read the reference" in p.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grader confines student code with Linux features")
def test_a_killed_grader_leaves_no_process_and_no_scratch(tmp_path):
    """SIGKILL the grader while a student's unit loops and its daemon sleeps: the supervisors see
    their control pipes close, end every process the unit started and remove the scratch
    folders; no results.json is written."""
    kit = pytest.importorskip("assign")
    hw, scratch_tmp = tmp_path / "hw", tmp_path / "tmp"
    scratch_tmp.mkdir()
    assert kit_run("make", "--units", "schedules", "--out", hw, timeout=120).returncode == 0
    token = str(800000 + os.getpid() % 99999)
    with open(hw / "cdm.py", "a") as f:
        f.write(f"\n\ndef cosine_schedule(T, offset=0.008, max_beta=0.999):\n    import os\n"
                f"    if os.fork() == 0:\n        os.setsid()\n        os.execv('/bin/sleep', ['/bin/sleep', '{token}'])\n"
                f"    while True:\n        pass\n")
    grader = subprocess.Popen([sys.executable, os.path.join(HERE, "assign.py"), "grade", str(hw), "--timeout", "300"],
                              env={**os.environ, "TMPDIR": str(scratch_tmp)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if _processes_with(token):
                break
            time.sleep(0.1)
        assert _processes_with(token), "the student's daemon never started"
        grader.kill()
        grader.wait()
        for _ in range(100):
            if not _processes_with(token) and not list(scratch_tmp.iterdir()):
                break
            time.sleep(0.1)
        assert _processes_with(token) == [] and list(scratch_tmp.iterdir()) == []
        assert not (hw / "results.json").exists()
    finally:
        grader.kill()
        for pid in _processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_a_grader_that_cannot_grade_says_so_and_writes_no_scores(tmp_path):
    """A missing dependency (numpy and torch unreachable: Python started without its site
    packages), a kit file missing, a reference that fails its own cases: one error line each,
    before anyone is graded, and no results.json."""
    kit = pytest.importorskip("assign")
    hw = tmp_path / "hw"
    assert kit_run("make", "--units", "schedules", "--out", hw, timeout=120).returncode == 0
    p = subprocess.run([sys.executable, "-S", os.path.join(HERE, "assign.py"), "grade", str(hw)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: the grader cannot run")
    assert "numpy" in p.stderr or "torch" in p.stderr
    broken = tmp_path / "kit"
    broken.mkdir()
    for name in kit.BUNDLE_FILES:
        if name != "grading.py":
            (broken / name).write_bytes(open(os.path.join(HERE, name), "rb").read())
    p = subprocess.run([sys.executable, str(broken / "assign.py"), "grade", str(hw)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "grading.py is missing or unreadable" in p.stderr
    (broken / "grading.py").write_bytes(open(os.path.join(HERE, "grading.py"), "rb").read())
    ref = (broken / "cdm.py").read_text()
    (broken / "cdm.py").write_text(ref.replace("def cosine_schedule(T, offset=0.008, max_beta=0.999):\n",
                                               "def cosine_schedule(T, offset=0.008, max_beta=0.999):\n    1 / 0\n", 1))
    p = subprocess.run([sys.executable, str(broken / "assign.py"), "grade", str(hw)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "reference fails its own cases" in p.stderr
    assert not (hw / "results.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grader confines student code with Linux features")
def test_the_gradescope_bundle_grades_right_wrong_and_cheating_submissions(tmp_path):
    """`make` writes the autograder zip; unpacked into an /autograder-shaped folder, its
    run_autograder grades a right, a wrong and a cheating submission (which also claims, in an
    assignment.json of its own, that only one unit was set) into results/results.json; the
    reference in source/ is made unreadable to others first."""
    import zipfile
    kit = pytest.importorskip("assign")
    ref = reference_source()
    assert kit_run("make", "--units", "posterior", "--out", tmp_path / "hw", timeout=120).returncode == 0
    with zipfile.ZipFile(tmp_path / "hw-autograder.zip") as z:
        names = set(z.namelist())
        assert {"setup.sh", "run_autograder"} | {f"source/{n}" for n in kit.BUNDLE_FILES} <= names
        setup = z.read("setup.sh").decode()
        assert "torch==2.13.0" in setup and "numpy==" in setup and "pytest" not in setup
    wrong, function, old, new = kit.WRONG_ANSWERS["posterior"][1]
    submissions = {
        "right": (ref, 1),
        "wrong": (kit.mutated_source(ref, function, old, new), 0),
        "cheating": ((tmp_path / "hw" / "cdm.py").read_text() + CHEATS.replace("VICTIM", "'/nonexistent'")
                     .replace("REFERENCE", "'/nonexistent'").replace("TOKEN", "'1'"), 0),
    }
    for name, (source, want) in submissions.items():
        root = tmp_path / name
        with zipfile.ZipFile(tmp_path / "hw-autograder.zip") as z:
            z.extractall(root)
        for script in ("setup.sh", "run_autograder"):
            (root / script).chmod(0o755)
        (root / "submission").mkdir()
        (root / "submission" / "cdm.py").write_text(source)
        (root / "submission" / "assignment.json").write_text('{"units": ["schedules", "blur"]}')
        p = subprocess.run([str(root / "run_autograder")], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable})
        assert p.returncode == 0, p.stdout + p.stderr
        results = json.loads((root / "results" / "results.json").read_text())
        assert [t["name"].split(" ")[1] for t in results["tests"]] == ["posterior"], name
        assert results["score"] == want, (name, results)
        assert (root / "source").stat().st_mode & 0o077 == 0


def test_the_grader_reads_only_regular_files_inside_a_submission(tmp_path):
    """A grader running as root reads what a student hands in: a cdm.py that is a link (to
    /etc/shadow, say), a folder that is a link, a FIFO or a huge file is refused by name."""
    kit = pytest.importorskip("assign")
    (tmp_path / "figures").symlink_to("/etc")
    (tmp_path / "cdm.py").symlink_to("/etc/passwd")
    os.mkfifo(tmp_path / "stage_flags.txt")
    (tmp_path / "big.py").write_bytes(b"#" * 2000)
    (tmp_path / "ok.txt").write_text("fine")
    for name, says in (("cdm.py", "it is a link"), ("figures/passwd", "not inside the submission"),
                       ("stage_flags.txt", "not a regular file"), ("big.py", "larger than"), ("none.py", "no none.py")):
        with pytest.raises(ValueError, match=says):
            kit.read_submission(str(tmp_path), name, 1000)
    assert kit.read_submission(str(tmp_path), "ok.txt", 1000) == b"fine"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grader confines student code with Linux features")
def test_a_sandbox_that_cannot_confine_says_so_by_a_channel_the_student_cannot_reach(tmp_path):
    """Whether the student's process started confined comes from the supervisor's own pipe, not
    from an exit status the student could fake: a process that ran and exited 126 was confined; a
    scratch folder that cannot be entered leaves it unconfined, and the grader is told why."""
    import sandbox
    ran = sandbox.Sandbox(str(tmp_path), [sys.executable, "-I", "-c", "import os; os._exit(126)"]).start()
    assert ran.wait() == 126 and ran.confinement() == ""
    broken = sandbox.Sandbox(str(tmp_path / "missing"), [sys.executable, "-I", "-c", "print('ran')"]).start()
    broken.wait()
    assert broken.confinement().startswith("not confined: FileNotFoundError")


# --- the stage assignment ---------------------------------------------------------------------

def _png(path, w=300, h=200, flat=False, fmt="PNG"):
    rng = np.random.default_rng(0)
    pixels = np.full((h, w, 3), 128, np.uint8) if flat else rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def test_the_stage_assignments_flags_and_figures_are_checked(tmp_path):
    """The flags a student may give train_sr.py are the model's, training's and sampling's only,
    each refused in one line otherwise; a figure counts only as a readable PNG of some size."""
    kit = pytest.importorskip("assign")
    assert kit.check_stage_flags("") == ([], "")
    assert kit.check_stage_flags("--steps 10 --lr 1e-3  # comments are fine\n") == (["--steps", "10", "--lr", "1e-3"], "")
    for text, says in (("--out /etc", "--out may not be set"), ("--ou x", "--ou may not be set"),
                       ("-h", "-h may not be set"), ("--data cifar10 --steps 5", "--data may not be set"),
                       ("--seed 3", "--seed may not be set"), ("--steps -5", "train_sr.py refuses them"),
                       ("--steps ten", "train_sr.py refuses them"), ("--sample_steps 1000", "at most 100 sampling steps"),
                       ("--steps 'ten", "cannot be read as flags")):
        flags, why = kit.check_stage_flags(text)
        assert flags is None and says in why and "\n" not in why, (text, why)
    _png(tmp_path / "ok.png")
    _png(tmp_path / "small.png", 50, 50)
    _png(tmp_path / "flat.png", flat=True)
    _png(tmp_path / "photo.png", fmt="JPEG")
    (tmp_path / "junk.png").write_bytes(os.urandom(2000))
    assert kit.figure_readable(str(tmp_path / "ok.png")) == ""
    for name, says in (("missing.png", "missing"), ("small.png", "only 50 x 50"), ("flat.png", "flat colour"),
                       ("photo.png", "JPEG"), ("junk.png", "cannot be read")):
        assert says in kit.figure_readable(str(tmp_path / name)), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grader confines student code with Linux features")
def test_the_stage_assignment_is_trained_confined_and_scored(tmp_path, monkeypatch):
    """The stage is trained in the sandbox from the student's flags with their cdm.py and scored
    by the kit: a short run gets its point for training and its figures, and fails the quality
    thresholds it does not meet; a run over its CPU budget and a cdm.py that cannot train get
    nothing but their figures. (The reference's full run, 5 of 5, is measured in docs/teaching.md.)"""
    kit = pytest.importorskip("assign")
    folder = tmp_path / "hw"
    _png(folder / "figures" / "s_sweep.png")
    _png(folder / "figures" / "samplers.png")
    (folder / "cdm.py").write_text(reference_source())
    (folder / "stage_flags.txt").write_text("--steps 3 --batch_size 4 --sample_steps 2\n")
    import evaluate                     # scoring runs here: an untrained classifier saves its training
    monkeypatch.setattr(evaluate, "get_classifier", lambda source, res, cache, n, seed=0: evaluate.Classifier(n).eval())
    session = kit.Session(1)
    cache = tmp_path / "classifier.pt"
    try:
        points, total, out = kit.grade_stage(str(folder), session, seed=5, samples=16, classifier_cache=str(cache))
        assert total == kit.STAGE_POINTS and "trained within the budget" in out, out
        assert "low-res consistency (dB)" in out and "(>= 28 needed): 0 of 1" in out, out
        assert 2 <= points < total
        points, _, out = kit.grade_stage(str(folder), session, seed=5, samples=16, cpu_seconds=1,
                                         classifier_cache=str(cache))
        assert points == 1 and "did not train" in out, out
        (folder / "cdm.py").write_text(kit.stubbed_source(reference_source(), {"q_sample"}))
        points, _, out = kit.grade_stage(str(folder), session, seed=5, samples=16, classifier_cache=str(cache))
        assert points == 1 and "training exited with status 1" in out and "exercise 2 (q_sample)" in out, out
    finally:
        session.close()
    assert not os.path.exists(session.root)
