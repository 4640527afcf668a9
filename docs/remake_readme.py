"""Remake README's logs and pictures from a real run of the current code, so that a student's run looks like them;
and keep the reading tour's line numbers true.

    python docs/remake_readme.py tour        # rewrites the line number of every definition the tour names (instant)
    python docs/remake_readme.py first-run   # trains the default adder (1 to 3 minutes on 2 CPU cores), redraws
                                             # docs/addition-attention.png, rewrites the first-run log, the inspect
                                             # table and the walk-through of what the adder attends to
    python docs/remake_readme.py exercises   # runs a student's worked session, bug drills, a messy class graded
                                             # into a gradebook and Gradescope's results.json; rewrites those blocks
    python docs/remake_readme.py all

Each remade block sits between `<!-- remake:NAME -->` and `<!-- /remake:NAME -->`, in README.md or in one of
docs/*.md (the exercises' blocks are in docs/exercises.md); the prose around the blocks is written by hand.
Everything runs in a temporary folder; paths in the output are shown as a user's would be (`out/addition-2digit`,
`~/gpt2-class`, `submissions/alice`). Timings in the logs are whatever this machine took: write down in the
commit which machine and how busy it was.

The tour names each definition with its file and line:
`` `GPT2Attention.forward` ([nanogpt2.py:313](nanogpt2.py#L313)) `` (in docs/, the link is `../nanogpt2.py#L313`).
A dotted name is found in the file's syntax tree (a module-level function, class or constant, or a class's method
or attribute); a name written as a comment (`# Part II`, `# --- Beam search`) is the one line of the file that
starts with it. tests/test_readme.py fails when a number is stale or a name is gone.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
README = os.path.join(REPO, "README.md")
PROMPT = "57+68=521"  # 57 + 68 = 125, its answer written least significant digit first
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def run(args, cwd, check=True, shown=None):
    """Run a command; return its stdout and stderr together, as a terminal shows them (stderr lines first when
    the command prints its progress there)."""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=os.path.join(REPO, "tests", "fixtures", "tiktoken"), COLUMNS="120")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def markdown_files():
    """README.md and docs/*.md, the files whose blocks this script remakes."""
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def replace_block(texts, name, body):
    """texts: {path: text} of the markdown files. The one holding the block NAME gets `body` in it."""
    pattern = re.compile(rf"(<!-- remake:{name} -->\n).*?(<!-- /remake:{name} -->)", re.S)
    holders = [path for path, text in texts.items() if pattern.search(text)]
    if len(holders) != 1:
        raise SystemExit(f"<!-- remake:{name} --> ... <!-- /remake:{name} --> should be in one of README.md and "
                         f"docs/*.md, found in {len(holders)}")
    texts[holders[0]] = pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), texts[holders[0]])
    return texts


# --- The tour: each definition it names, with its file and line -----------------------------------------------

# `NAME` ([FILE:LINE](LINK#LLINE)), a space or a line break after the name. FILE is the file's path from the
# repository's root, LINK the same file's path from the markdown file (`../nanogpt2.py` in docs/); the two line
# numbers must agree.
TOUR_REFERENCE = re.compile(r"`(?P<name>[^`\n]+)`(?P<gap>\s+)\(\[(?P<file>[\w./-]+\.py):(?P<line>\d+)\]"
                            r"\((?P<target>[\w./-]+\.py)#L(?P<anchor>\d+)\)\)")
# Any link to a line of a file, so that one written in another form is not silently left unchecked.
LINE_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)#L\d+\)")


def tour_references(text):
    """Every `NAME` ([FILE:LINE](LINK#LLINE)) in a markdown text: (name, file, line, link's file, link's line,
    the match)."""
    return [(m["name"], m["file"], int(m["line"]), m["target"], int(m["anchor"]), m)
            for m in TOUR_REFERENCE.finditer(text)]


def definition_lines(path):
    """{name: [line, ...]} of what a Python file defines: module-level functions, classes and assigned names,
    and `Class.name` for each method, nested class and assigned name of a module-level class."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = {}

    def names(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    for node in tree.body:
        for name in names(node):
            found.setdefault(name, []).append(node.lineno)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                for name in names(member):
                    found.setdefault(f"{node.name}.{name}", []).append(member.lineno)
    return found


def find_line(path, name):
    """The line (from 1) where `name` is defined in the file at `path`, or a ValueError saying why there is none.
    A name starting with "# " is a comment: the one line that is it, or starts with it followed by a space or
    a colon (`# Part II` finds `# Part II: what the reference also has`)."""
    if not os.path.isfile(path):
        raise ValueError(f"{os.path.relpath(path, REPO)} does not exist")
    if name.startswith("# "):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        hits = [i + 1 for i, line in enumerate(lines)
                if line == name or (line.startswith(name) and line[len(name)] in " :")]
    else:
        hits = definition_lines(path).get(name, [])
    if len(hits) != 1:
        where = os.path.relpath(path, REPO)
        raise ValueError(f"`{name}` is not in {where}" if not hits else
                         f"`{name}` is in {where} {len(hits)} times (lines {', '.join(map(str, hits))})")
    return hits[0]


def tour_problems(text, base=REPO, root=REPO):
    """What is wrong with a markdown text's tour references, one line each: a stale line number, a name no
    longer defined, a link that disagrees with its label, or a line link not written as a tour reference.
    base: the markdown file's folder (links are relative to it); root: the repository (labels are from it)."""
    problems = []
    for name, file, line, target, anchor, m in tour_references(text):
        path = os.path.normpath(os.path.join(root, file))
        if path != os.path.normpath(os.path.join(base, target)) or line != anchor:
            problems.append(f"{m.group(0)}: the label and the link disagree")
            continue
        try:
            actual = find_line(path, name)
        except ValueError as e:
            problems.append(f"{m.group(0)}: {e}")
            continue
        if actual != line:
            problems.append(f"`{name}` is at {file}:{actual}, not {line} (python docs/remake_readme.py tour)")
    spans = [m.span() for *_, m in tour_references(text)]
    for m in LINE_LINK.finditer(text):
        if not any(start <= m.start() < end for start, end in spans):
            problems.append(f"{m.group(0)}: a line link outside the form `NAME` ([FILE:LINE](LINK#LLINE))")
    return problems


def remake_tour(texts):
    """Every tour reference's line number (and link), in README.md and docs/*.md, rewritten from the code. A name
    no longer found is left as it is and reported, one line each, for a person to correct: returns the texts and
    that list."""
    unfound = []
    for path, text in texts.items():
        base = os.path.dirname(path)

        def renumber(m):
            try:
                line = find_line(os.path.join(REPO, m["file"]), m["name"])
            except ValueError as e:
                unfound.append(f"{os.path.relpath(path, REPO)}: {e}")
                return m.group(0)
            link = os.path.relpath(os.path.join(REPO, m["file"]), base)
            return f"`{m['name']}`{m['gap']}([{m['file']}:{line}]({link}#L{line}))"

        texts[path] = TOUR_REFERENCE.sub(renumber, text)
    return texts, unfound


def fenced(text, language="text"):
    return f"```{language}\n{text.rstrip()}\n```\n"


# --- The first run: the default adder ------------------------------------------------------------------------


def shorten_log(log):
    """Keep every line but the step lines; of those, the first two, every 500th step, and the last two."""
    lines = log.rstrip("\n").splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    keep = set(steps[:2] + steps[-2:])
    keep |= {i for i in steps if int(re.match(r"step +(\d+)", lines[i]).group(1)) % 500 == 0}
    out = []
    for i, line in enumerate(lines):
        if i in steps and i not in keep:
            if out[-1] != "...":
                out.append("...")
            continue
        out.append(line)
    return "\n".join(out)


def walk_through(model_dir, prompt):
    """What each head looks at hardest from each answer position, in words, with the weights."""
    import torch

    import nanogpt2

    model = nanogpt2.GPT2LMHeadModel.from_pretrained(model_dir)
    tokenizer = nanogpt2.tokenizer_for(model.config)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    probs = out.logits[0].softmax(-1)
    a, rest = prompt.split("+")
    b, answer = rest.split("=")
    digits = len(a)
    equals = prompt.index("=")
    names = {}
    for place in range(digits):
        unit = ["units", "tens", "hundreds"][digits - 1 - place]
        names[place] = f"the {unit} digit of {a}"
        names[digits + 1 + place] = f"the {unit} digit of {b}"
    names[digits], names[equals] = "`+`", "`=`"
    for k in range(len(answer)):
        names[equals + 1 + k] = f"the answer's digit `{answer[k]}` already written"

    def looks(row):
        """Per layer, the heads grouped by the position each looks at hardest: 'heads 0, 2 at the units digit
        of 68, `8` (0.98, 0.97)'."""
        layers = []
        for layer, weights in enumerate(out.attentions):
            targets = {}
            for head in range(weights.size(1)):
                w = weights[0, head, row]
                key = int(w.argmax())
                targets.setdefault(key, []).append((head, float(w[key])))
            groups = []
            for key, heads in sorted(targets.items(), key=lambda kv: kv[1][0][0]):
                where = names.get(key, f"position {key}")
                where = where if where.startswith("`") else f"{where}, `{prompt[key]}`"
                groups.append(f"head{'s' if len(heads) > 1 else ''} {', '.join(str(h) for h, _ in heads)} at "
                              f"{where} ({', '.join(f'{w:.2f}' for _, w in heads)})")
            layers.append(f"layer {layer}: " + "; ".join(groups))
        return layers

    carry = 0
    bullets = []
    for k in range(len(answer)):
        row = equals + k
        da = int(a[digits - 1 - k]) if k < digits else 0
        db = int(b[digits - 1 - k]) if k < digits else 0
        total = da + db + carry
        what = (f"{da} + {db}" + (f" + {carry} carried" if carry else "") + f" = {total} -> `{total % 10}`"
                if k < digits else f"the carry out of the last column, `{total}`")
        carry = total // 10
        expected = int(answer[k])
        guess = int(probs[row].argmax())
        verdict = f"it gives `{expected}` {float(probs[row, expected]):.3f}" + \
            ("" if guess == expected else f", but prefers `{tokenizer.decode([guess])}`")
        bullet = (f"- Row {row} (`{prompt[row]}`) writes answer digit {k + 1}, {what}; {verdict}. "
                  "Where the heads look hardest: " + ". ".join(looks(row)) + ".")
        bullets.append("\n".join(textwrap.wrap(bullet, 110, subsequent_indent="  ", break_on_hyphens=False)))
    return "\n".join(bullets)


def remake_first_run(texts):
    with tempfile.TemporaryDirectory() as tmp:
        log = run([sys.executable, os.path.join(REPO, "nanogpt2.py"), "train"], cwd=tmp).stdout
        model_dir = os.path.join(tmp, "out", "addition-2digit")
        table = run([sys.executable, os.path.join(REPO, "nanogpt2.py"), "inspect", "--model", model_dir, "--prompt",
                     PROMPT, "--out", "attention.png"], cwd=tmp).stdout
        shutil.copyfile(os.path.join(tmp, "attention.png"), os.path.join(DOCS, "addition-attention.png"))
        rows = table.splitlines()
        header = next(i for i, line in enumerate(rows) if line.strip().startswith("pos"))
        answer_rows = [line for line in rows[header + 1:]
                       if PROMPT.index("=") <= int(line.split()[0]) < len(PROMPT) - 1]
        sample = run([sys.executable, os.path.join(REPO, "nanogpt2.py"), "sample", "--model", model_dir, "--prompt",
                      "12+34=", "--temperature", "0"], cwd=tmp).stdout
        texts = replace_block(texts, "sample", fenced(
            '$ python nanogpt2.py sample --model out/addition-2digit --prompt "12+34=" --temperature 0\n' + sample))
        texts = replace_block(texts, "first-run-log", fenced(shorten_log(log)))
        texts = replace_block(texts, "inspect-table", fenced("\n".join([rows[header], *answer_rows])))
        texts = replace_block(texts, "walk-through", walk_through(model_dir, PROMPT))
    return texts


# --- The exercises: a student's session, drills, a class ----------------------------------------------------------


def exercises_cli(*args, cwd, home=None):
    """`python tests/exercises.py ...` run from `cwd`, shown as typed from the repository root."""
    result = run([sys.executable, os.path.join(REPO, "tests", "exercises.py"), *args], cwd=cwd)
    output = result.stderr + result.stdout
    if home:
        output = output.replace(home, "~")
    shown = " ".join(a if " " not in a else f'"{a}"' for a in args)
    if home:
        shown = shown.replace(home, "~")
    return f"$ python tests/exercises.py {shown}\n{output}"


def edit(path, qualname, body):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    node = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == qualname)
    lines = text.splitlines(keepends=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(lines[:node.body[0].end_lineno]) + body + "".join(lines[node.end_lineno:]))


def put_back(path, qualnames):
    """The reference's code of `qualnames` put back into the student file at `path` (as a student writes it)."""
    import exercises

    with open(path, encoding="utf-8") as f:
        mine = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(exercises.restore(mine, exercises.read_repo_file(os.path.basename(path)), qualnames))


def remake_exercises(texts):
    with tempfile.TemporaryDirectory() as home:
        student = os.path.join(home, "gpt2-class")
        session = [exercises_cli("start", "lm-loss", "--out", student, cwd=home, home=home)]
        path = os.path.join(student, "nanogpt2.py")
        edit(path, "shifted_lm_loss", "    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), "
                                      "labels.reshape(-1), ignore_index=-100)\n")
        texts = replace_block(texts, "session-start", fenced(session[0]))
        texts = replace_block(texts, "session-fail", fenced(exercises_cli("check", student, "--hint", cwd=home,
                                                                        home=home)))
        put_back(path, ["shifted_lm_loss"])
        texts = replace_block(texts, "session-pass", fenced(exercises_cli("check", student, cwd=home, home=home)))

        chapter = os.path.join(home, "attention")
        exercises_cli("start", "attention", "--out", chapter, cwd=home)
        put_back(os.path.join(chapter, "nanogpt2.py"), ["GPT2Attention.split_heads", "GPT2Attention.merge_heads"])
        texts = replace_block(texts, "session-chapter", fenced(
            exercises_cli("check", chapter, "--only", "heads", "kv-cache", cwd=home, home=home)))

        drills = [exercises_cli("start", "attention-bugs", "--student", name, "--out", os.path.join(home, folder),
                                cwd=home, home=home)
                  for name, folder in (("Ada Lovelace", "ada"), ("Alan Turing", "alan"))]
        for folder in ("ada", "alan"):  # what the teacher sees: the bug each name drew
            found = run(["grep", "-A3", '"drills"', os.path.join(home, folder, "exercises.json")], cwd=home).stdout
            drills.append(f"$ grep -A3 '\"drills\"' ~/{folder}/exercises.json\n{found}")
        texts = replace_block(texts, "drills", fenced("\n".join(drills)))

        submissions = os.path.join(home, "submissions")
        make_class(submissions)
        graded = exercises_cli("grade", *[f"submissions/{n}" for n in sorted(os.listdir(submissions))], "--assignment",
                               "lm-loss", "top-k", "tensorflow-bugs", "--time-limit", "30", "--csv", "grades.csv",
                               "--gradescope-dir", "gradescope", cwd=home)
        graded = graded.replace(" ".join(f"submissions/{n}" for n in sorted(os.listdir(submissions))),
                                "submissions/*")
        with open(os.path.join(home, "grades.csv"), encoding="utf-8") as f:
            table = f.read()
        texts = replace_block(texts, "grade", fenced(graded) + "\n" + fenced(table, "csv"))
        with open(os.path.join(home, "gradescope", "alice", "results.json"), encoding="utf-8") as f:
            texts = replace_block(texts, "gradescope", fenced(f.read(), "json"))
    return texts


def make_class(root):
    """Five folders as a class hands them in: two that did different work (one a drill), one untouched, one
    without exercises.json, one whose file does not parse; an endless loop in someone's function."""
    import exercises

    cli = [sys.executable, os.path.join(REPO, "tests", "exercises.py"), "start"]
    for name, names in (("alice", ["lm-loss", "top-k"]), ("bob", ["tensorflow-bugs", "--student", "Bob"]),
                        ("carol", ["lm-loss", "top-k"]), ("erin", ["lm-loss", "top-k"])):
        run([*cli, *names, "--out", os.path.join(root, name)], cwd=REPO)
    alice = os.path.join(root, "alice", "nanogpt2.py")
    put_back(alice, ["shifted_lm_loss"])
    edit(alice, "top_k_filter", "    while True:  # waits for the k-th largest to turn up\n        pass\n")
    bob = os.path.join(root, "bob", "convert_tf.py")
    put_back(bob, [exercises.BY_ID[exercises.drill("sstable", "Bob")]["edits"][0][0]])
    os.makedirs(os.path.join(root, "dave"))
    shutil.copyfile(os.path.join(REPO, "nanogpt2.py"), os.path.join(root, "dave", "nanogpt2.py"))
    erin = os.path.join(root, "erin", "nanogpt2.py")
    with open(erin, encoding="utf-8") as f:
        mine = f.read()
    with open(erin, "w", encoding="utf-8") as f:
        f.write(mine.replace("def top_k_filter(logits", "def top_k_filter(logits,,", 1))


def main(argv):
    if not argv or argv[0] not in ("tour", "first-run", "exercises", "all"):
        raise SystemExit(__doc__)
    texts = {}
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            texts[path] = f.read()
    before = dict(texts)
    if argv[0] in ("first-run", "all"):
        texts = remake_first_run(texts)
    if argv[0] in ("exercises", "all"):
        texts = remake_exercises(texts)
    unfound = []
    if argv[0] in ("tour", "all"):
        texts, unfound = remake_tour(texts)
    changed = [path for path in texts if texts[path] != before[path]]
    for path in changed:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(texts[path])
        os.replace(tmp, path)
    shown = [os.path.relpath(path, REPO) for path in changed]
    if argv[0] in ("first-run", "all"):
        shown.append("docs/addition-attention.png")
    print(f"rewrote {', '.join(shown)}" if shown else "nothing to change")
    if unfound:
        raise SystemExit("correct these tour references by hand (name a definition or banner that exists):\n  "
                         + "\n  ".join(unfound))


if __name__ == "__main__":
    main(sys.argv[1:])
