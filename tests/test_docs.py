"""The docs cannot rot: README.md and docs/*.md are read, and what they state is checked against the code.

- Flags. Every `--flag` on a line belongs to the nearest program named before it on that line, and must be one
  of that program's flags: bear-train.py, a script of benchmarks/ or tests/mutations.py (their argparse flags),
  or pytest (`python -m pytest --help`). A flag before any program name belongs to bear-train.py, or to a script
  that the line names. Flags after another tool's command (pip install, ray start, srun, #SBATCH, sbatch,
  scontrol, taskset, tensorboard, python3 -m venv) are that tool's and are not checked. In a code block, a line
  ending in a backslash continues on the next.
- Links and images. Every relative link and image exists (relative to the page); a link to a heading
  (`page.md#heading`, `#heading`) names a heading of that page, by GitHub's anchor rule. Every repository path
  named in backticks (`bear-train.py`, `benchmarks/...`, `tests/...`, `docs/...`, `.ci/...`) exists.
- Defaults. In a table with a "flag" and a "default" column, the default's code span is the Config default of
  that flag (`on`/`off` for switches, `empty` for an empty string; several flags in one cell: one code span each,
  or one for all); in prose, "`--flag` (X)", "`--flag` word (default X)" and "`--flag`, default X", with a number
  or a code span as X, the same.
"""
import ast
import contextlib
import dataclasses
import functools
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SCRIPTS = {"speed.py": ROOT / "benchmarks/speed.py", "sweep.py": ROOT / "benchmarks/sweep.py",
           "minari_local.py": ROOT / "benchmarks/minari_local.py",
           "d3rlpy_actor_gradient.py": ROOT / "benchmarks/d3rlpy_actor_gradient.py",
           "mmd_floor.py": ROOT / "benchmarks/mmd_floor.py",
           "learning_check.sh": ROOT / "benchmarks/learning_check.sh", "mutations.py": ROOT / "tests/mutations.py"}
OTHER_TOOLS = ["pip install", "pip download", "ray start", "srun", "#SBATCH", "sbatch", "scontrol", "taskset",
               "tensorboard", "python3 -m venv"]
PROGRAM = re.compile("|".join([r"bear-train\.py", r"\bpytest\b"] + [re.escape(s) for s in SCRIPTS]
                              + [re.escape(t) for t in OTHER_TOOLS]))
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMG_TAG = re.compile(r"<img[^>]*\bsrc=\"([^\"]+)\"")
REPO_PATH = re.compile(r"`((?:benchmarks|tests|docs|\.ci)/[\w./-]+|bear-train\.py|requirements\.txt|LICENSE)`")
VALUE = r"(`[^`]*`|-?\d[\d \u00a0\u202f]*(?:\.\d+)?(?:e-?\d+)?)"
PROSE_DEFAULT = re.compile(rf"`--([\w-]+)`(?: \({VALUE}\)|(?: \w+)? \(default {VALUE}\)|,? default {VALUE}(?!\.?\d))")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def doc_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text), with a code block's backslash-continued lines joined."""
    out, fence, pending = [], False, None
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.lstrip().startswith("```"):
            fence = not fence
            out.append((number, text))
            continue
        if pending is not None:
            number, text = pending[0], pending[1] + " " + text
            pending = None
        if fence and text.endswith("\\"):
            pending = (number, text[:-1])
            continue
        out.append((number, text))
    return out


@functools.cache
def script_flags() -> frozenset[str]:
    """bear-train.py's flags, as its own parser prints them in --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        load_script().parse_args(["--help"])
    return frozenset(FLAG.findall(out.getvalue())) | {"help"}


@functools.cache
def helper_flags(name: str) -> frozenset[str]:
    """The flags of a script of benchmarks/ or tests/: the option strings of its add_argument calls."""
    path = SCRIPTS[name]
    if path.suffix != ".py":
        return frozenset()
    flags = {"help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value[2:] for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return frozenset(flags)


@functools.cache
def pytest_flags() -> frozenset[str]:
    text = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    return frozenset(FLAG.findall(text))


def allowed(program: str | None, line: str) -> frozenset[str] | None:
    """The flags a flag after `program` on this line may be; None: another tool's, not checked."""
    if program is None:
        named = [m.group(0) for m in PROGRAM.finditer(line) if m.group(0) in SCRIPTS]
        return script_flags().union(*(helper_flags(n) for n in named))
    if program == "bear-train.py":
        return script_flags()
    if program == "pytest":
        return pytest_flags()
    if program in SCRIPTS:
        return helper_flags(program)
    return None


def flag_errors(path: Path) -> list[str]:
    errors = []
    for number, line in doc_lines(path):
        programs = [(m.start(), m.group(0)) for m in PROGRAM.finditer(line)]
        for m in FLAG.finditer(line):
            before = [p for start, p in programs if start < m.start()]
            flags = allowed(before[-1] if before else None, line)
            if flags is not None and m.group(1) not in flags:
                owner = before[-1] if before else "bear-train.py"
                errors.append(f"{rel(path)}:{number}: --{m.group(1)} is not a flag of {owner}")
    return errors


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, out, fence = {}, set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def link_errors(path: Path) -> list[str]:
    errors = []
    for number, line in doc_lines(path):
        targets = [(bang == "!", t) for bang, t in LINK.findall(line)] + [(True, t) for t in IMG_TAG.findall(line)]
        for image, target in targets:
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            what = "image" if image else "link"
            if not dest.exists():
                errors.append(f"{rel(path)}:{number}: {what} {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{rel(path)}:{number}: {target}: no heading #{anchor} in {dest.name}")
        for named in REPO_PATH.findall(line):
            if not (ROOT / named).exists():
                errors.append(f"{rel(path)}:{number}: {named} does not exist")
    return errors


def stated_default(field: dataclasses.Field, text: str):
    value = text.strip("`").strip()
    if field.type is bool:
        return {"on": True, "off": False}.get(value, value)
    if field.type is str:
        return "" if value == "empty" else value
    value = value.replace(" ", "").replace("\u202f", "").replace("_", "")
    return load_script().parse_int(value) if field.type is int else float(value)


def default_errors(path: Path) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(load_script().Config)}
    statements, header = [], None  # (line number, flag, stated value)
    for number, line in doc_lines(path):
        row = line.strip()
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row[1:-1] if row.endswith("|") else row[1:])] \
            if row.startswith("|") else None
        if cells is None:
            header = None
            statements += [(number, f, "".join(v)) for f, *v in PROSE_DEFAULT.findall(line)]
        elif header is None:
            header = [c.lower() for c in cells]
        elif "flag" in header and "default" in header and not set(line) <= set("|-: "):
            flag, value = cells[header.index("flag")], cells[header.index("default")]
            names, code = FLAG.findall(flag), re.findall(r"`[^`]*`", value)
            if not names or not code:
                statements.append((number, flag, None))
            else:  # several flags in one cell: one value for all, or one each
                statements += [(number, n, v) for n, v in zip(names, code if len(code) == len(names) else
                                                               code[:1] * len(names))]
    errors = []
    for number, flag, value in statements:
        where = f"{rel(path)}:{number}"
        name = flag.replace("-", "_")
        if value is None:
            errors.append(f"{where}: a default row needs a `--flag` and its value in backticks: {flag}")
        elif name not in fields:
            errors.append(f"{where}: --{flag} is not a hyperparameter of Config")
        else:
            try:
                stated = stated_default(fields[name], value)
            except ValueError:
                stated = value
            if stated != fields[name].default:
                errors.append(f"{where}: --{flag} is stated as {value}, Config's default is {fields[name].default!r}")
    return errors


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_a_doc_names_is_a_flag_of_its_program(path):
    assert flag_errors(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_image_exists(path):
    assert link_errors(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stated_default_is_configs(path):
    assert default_errors(path) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A wrong flag, a missing page, a missing image, a wrong heading and a wrong default are each found."""
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n"
                    "Run `python bear-train.py --max-step=5` or `benchmarks/speed.py --parts bf16 --no-such-part`.\n"
                    "`pip install --upgrade x` and `python -m pytest -q --durations=5 tests`.\n"
                    "See [nothing](nowhere.md), [a heading](#a-page), [no heading](#no-page) and ![a plot](missing.png).\n"
                    "`tests/no_such_test.py` and `--eval-every` (1 000) and `--eval-episodes` (default 11).\n"
                    "`--log-every` steps (default 1 000), `--eval-threads`, default 2.\n\n"
                    "| flag | default |\n|---|---|\n| `--gpu` | `0` |\n| `--precision` | `bf16` |\n| `--resume` | `off` |\n")
    flags, links, defaults = flag_errors(page), link_errors(page), default_errors(page)
    assert [e.split(": ", 1)[1] for e in flags] == ["--max-step is not a flag of bear-train.py",
                                                    "--no-such-part is not a flag of speed.py"]
    assert [e.split(": ", 1)[1] for e in links] == ["link nowhere.md does not exist",
                                                    "#no-page: no heading #no-page in page.md",
                                                    "image missing.png does not exist",
                                                    "tests/no_such_test.py does not exist"]
    assert [e.split(": ", 1)[1] for e in defaults] == ["--eval-episodes is stated as 11, Config's default is 10",
                                                       "--eval-threads is stated as 2, Config's default is 1",
                                                       "--precision is stated as `bf16`, Config's default is 'fp32'"]
