"""README.md stays a newcomer's guide that tells the truth: short, in order, with line numbers that match the code.

The tour names each definition with its file and line, as `GPT2Attention.forward` followed by
([nanogpt2.py:313](nanogpt2.py#L313)); `python docs/remake_readme.py tour` rewrites the numbers from the code,
and these tests fail when one is stale, when a named definition is gone, when README outgrows its limits, or
when a link (to docs/, LICENSE, a heading) leads nowhere. docs/*.md are held to the same links and line numbers.
"""

import collections
import os
import re
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
DOCS = os.path.join(REPO, "docs")
README = os.path.join(REPO, "README.md")
sys.path.insert(0, DOCS)

import remake_readme  # noqa: E402

MAX_LINES = 650
CONTENTS_BY = 40  # the contents list ends within README's first 40 lines
TOUR_BY = 200  # the tour's heading is within its first 200 lines
TOUR_HEADING = "## A tour of nanogpt2.py"


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def markdown_files():
    return remake_readme.markdown_files()


def outside_code(text):
    """The text with fenced code blocks blanked (their lines kept, empty), so that a `# comment` in a bash or
    Python block is no heading and a `[x](y)` in code is no link."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
            lines.append("")
            continue
        lines.append("" if fence else line)
    return lines


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _, - and spaces kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    """Every heading's anchor, the second of two equal ones with -1 after it, as GitHub does."""
    seen, found = collections.Counter(), set()
    for line in outside_code(text):
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def links(text):
    """(line number, target) of every markdown link and image outside code, external ones left out."""
    found = []
    for number, line in enumerate(outside_code(text), 1):
        line = re.sub(r"``.*?``|`[^`]*`", "", line)  # code spans are no links
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            if not re.match(r"[a-z]+:", m.group(1)):
                found.append((number, m.group(1)))
    return found


@pytest.fixture(scope="module")
def readme():
    return read(README)


def test_readme_is_at_most_650_lines(readme):
    n = len(readme.splitlines())
    assert n <= MAX_LINES, f"README.md is {n} lines, over {MAX_LINES}: move reference material to docs/"


def test_the_contents_list_is_in_the_first_40_lines_and_leads_to_every_section(readme):
    lines = readme.splitlines()
    assert "## Contents" in lines, "README has no '## Contents' heading"
    start = lines.index("## Contents")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    items = [i for i in range(start, end) if re.match(r"\d+\. \[", lines[i])]
    assert items, "README's contents list has no numbered items"
    assert items[-1] < CONTENTS_BY, \
        f"README's contents list ends on line {items[-1] + 1}, not within the first {CONTENTS_BY}"
    listed = set(re.findall(r"\]\(#([^)]+)\)", "\n".join(lines[start:end])))
    sections = {slug(line[3:]) for line in outside_code(readme) if line.startswith("## ")} - {"contents"}
    assert not sections - listed, f"sections the contents list leaves out: {sorted(sections - listed)}"


def test_the_tour_heading_is_within_the_first_200_lines(readme):
    lines = readme.splitlines()
    assert TOUR_HEADING in lines, f"README has no '{TOUR_HEADING}' heading"
    assert lines.index(TOUR_HEADING) < TOUR_BY, \
        f"the tour starts on line {lines.index(TOUR_HEADING) + 1}, not within the first {TOUR_BY}"


def test_every_line_number_of_the_tour_is_where_its_definition_is(readme):
    references = remake_readme.tour_references(readme)
    tour = readme[readme.index(TOUR_HEADING):]
    tour = tour[:tour.find("\n## ")]
    named = {name for name, *_ in remake_readme.tour_references(tour)}
    assert len(named) >= 20, f"the tour names only {len(named)} definitions with their lines"
    for name in ("GPT2Attention.forward", "GPT2Block.forward", "GPT2Model.forward", "generate"):
        assert name in named, f"the tour no longer names `{name}` with its line"
    problems = remake_readme.tour_problems(readme)
    assert not problems, "README's tour is out of date with the code:\n" + "\n".join(problems)
    assert references


@pytest.mark.parametrize("path", [p for p in markdown_files() if p != README], ids=os.path.basename)
def test_docs_line_numbers_are_true_too(path):
    problems = remake_readme.tour_problems(read(path), base=os.path.dirname(path))
    assert not problems, f"{os.path.relpath(path, REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", markdown_files(), ids=os.path.basename)
def test_every_relative_link_leads_somewhere(path):
    text = read(path)
    broken = []
    for number, target in links(text):
        file, _, anchor = target.partition("#")
        where = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(where):
            broken.append(f"line {number}: {target}: {os.path.relpath(where, REPO)} does not exist")
        elif anchor and where.endswith(".md") and anchor not in anchors(read(where)):
            broken.append(f"line {number}: {target}: no heading with the anchor #{anchor}")
        elif anchor and where.endswith(".py") and not re.fullmatch(r"L\d+", anchor):
            broken.append(f"line {number}: {target}: a link into a .py file names a line, #L<number>")
    assert not broken, f"{os.path.relpath(path, REPO)} has broken links:\n" + "\n".join(broken)


def test_readme_links_to_the_license_and_the_docs(readme):
    targets = {target.partition("#")[0] for _, target in links(readme)}
    assert "LICENSE" in targets and os.path.exists(os.path.join(REPO, "LICENSE"))
    for name in ("exercises.md", "performance.md", "tests.md"):
        assert f"docs/{name}" in targets, f"README does not link docs/{name}"


def test_ci_runs_the_test_command_readme_gives(readme):
    m = re.search(r"### Run the tests\n+```bash\n(.*?)```", readme, re.S)
    assert m, "README has no '### Run the tests' heading followed by its command block"
    commands = [line.split("#")[0].strip() for line in m.group(1).splitlines() if line.strip()]
    ci = [line.strip() for line in read(os.path.join(REPO, ".ci", "run")).splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert [c.replace("python3 ", "python ") for c in ci[-len(commands):]] == commands, \
        f".ci/run does not end with README's test command {commands}"


def test_every_remade_block_is_in_one_file_and_the_script_writes_each(readme):
    in_files = collections.Counter()
    for path in markdown_files():
        text = read(path)
        opened = re.findall(r"<!-- remake:([\w-]+) -->", text)
        closed = re.findall(r"<!-- /remake:([\w-]+) -->", text)
        assert opened == closed, f"{os.path.relpath(path, REPO)}: remake blocks not closed in order"
        in_files.update(opened)
    assert all(n == 1 for n in in_files.values()), {k: v for k, v in in_files.items() if v > 1}
    written = set(re.findall(r'replace_block\(texts, "([\w-]+)"', read(os.path.join(DOCS, "remake_readme.py"))))
    assert set(in_files) == written, \
        f"blocks without a writer: {sorted(set(in_files) - written)}; writers without a block: " \
        f"{sorted(written - set(in_files))}"


def test_find_line_finds_definitions_and_comments_and_refuses_what_is_not_there(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("# Part I: the model\nX = 1\n\n\nclass A:\n    y: int = 0\n\n    def f(self):\n"
                    "        pass\n\n\ndef g():\n    pass\n# Part II\n", encoding="utf-8")
    assert remake_readme.find_line(str(path), "# Part I") == 1
    assert remake_readme.find_line(str(path), "# Part II") == 14
    assert remake_readme.find_line(str(path), "X") == 2
    assert remake_readme.find_line(str(path), "A") == 5
    assert remake_readme.find_line(str(path), "A.y") == 6
    assert remake_readme.find_line(str(path), "A.f") == 8
    assert remake_readme.find_line(str(path), "g") == 12
    for missing in ("h", "A.g", "# Part III", "# the model"):
        with pytest.raises(ValueError, match="not in"):
            remake_readme.find_line(str(path), missing)
    with pytest.raises(ValueError, match="2 times"):
        remake_readme.find_line(str(path), "# Part")
    text = "`A.f` ([m.py:8](m.py#L8)) and `g` ([m.py:11](m.py#L11)) and `A` ([m.py:5](m.py#L6))"
    problems = remake_readme.tour_problems(text, base=str(tmp_path), root=str(tmp_path))
    assert len(problems) == 2 and "`g` is at m.py:12, not 11" in problems[0] and "disagree" in problems[1]
    # a line link in another form is not left unchecked
    assert remake_readme.tour_problems("see [m.py](m.py#L3)", base=str(tmp_path), root=str(tmp_path))
