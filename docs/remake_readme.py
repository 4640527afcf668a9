"""Remake README's logs and pictures from a real run of the current code, so that a student's run looks like them.

    python docs/remake_readme.py first-run   # trains the default adder (1 to 3 minutes on 2 CPU cores), redraws
                                             # docs/addition-attention.png, rewrites the first-run log, the inspect
                                             # table and the walk-through of what the adder attends to
    python docs/remake_readme.py exercises   # runs a student's worked session, bug drills, a messy class graded
                                             # into a gradebook and Gradescope's results.json; rewrites those blocks
    python docs/remake_readme.py all

Each remade block sits in README.md between `<!-- remake:NAME -->` and `<!-- /remake:NAME -->`; the prose
around the blocks is written by hand. Everything runs in a temporary folder; paths in the output are shown as
a user's would be (`out/addition-2digit`, `~/gpt2-class`, `submissions/alice`). Timings in the logs are whatever
this machine took: write down in the commit which machine and how busy it was.
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


def replace_block(text, name, body):
    pattern = re.compile(rf"(<!-- remake:{name} -->\n).*?(<!-- /remake:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- remake:{name} --> ... <!-- /remake:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


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


def remake_first_run(text):
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
        text = replace_block(text, "sample", fenced("$ python nanogpt2.py sample --model out/addition-2digit --prompt "
                                                    '"12+34=" --temperature 0\n' + sample))
        text = replace_block(text, "first-run-log", fenced(shorten_log(log)))
        text = replace_block(text, "inspect-table", fenced("\n".join([rows[header], *answer_rows])))
        text = replace_block(text, "walk-through", walk_through(model_dir, PROMPT))
    return text


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


def remake_exercises(text):
    import exercises

    with tempfile.TemporaryDirectory() as home:
        student = os.path.join(home, "gpt2-class")
        session = [exercises_cli("start", "lm-loss", "--out", student, cwd=home, home=home)]
        path = os.path.join(student, "nanogpt2.py")
        edit(path, "shifted_lm_loss", "    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), "
                                      "labels.reshape(-1), ignore_index=-100)\n")
        text = replace_block(text, "session-start", fenced(session[0]))
        text = replace_block(text, "session-fail", fenced(exercises_cli("check", student, "--hint", cwd=home,
                                                                        home=home)))
        with open(path, encoding="utf-8") as f:
            mine = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(exercises.restore(mine, exercises.read_repo_file("nanogpt2.py"), ["shifted_lm_loss"]))
        text = replace_block(text, "session-pass", fenced(exercises_cli("check", student, cwd=home, home=home)))

        chapter = os.path.join(home, "attention")
        exercises_cli("start", "attention", "--out", chapter, cwd=home)
        with open(os.path.join(chapter, "nanogpt2.py"), encoding="utf-8") as f:
            mine = f.read()
        with open(os.path.join(chapter, "nanogpt2.py"), "w", encoding="utf-8") as f:
            f.write(exercises.restore(mine, exercises.read_repo_file("nanogpt2.py"),
                                      ["GPT2Attention.split_heads", "GPT2Attention.merge_heads"]))
        text = replace_block(text, "session-chapter", fenced(
            exercises_cli("check", chapter, "--only", "heads", "kv-cache", cwd=home, home=home)))

        drills = [exercises_cli("start", "attention-bugs", "--student", name, "--out", os.path.join(home, folder),
                                cwd=home, home=home)
                  for name, folder in (("Ada Lovelace", "ada"), ("Alan Turing", "alan"))]
        for folder in ("ada", "alan"):  # what the teacher sees: the bug each name drew
            found = run(["grep", "-A3", '"drills"', os.path.join(home, folder, "exercises.json")], cwd=home).stdout
            drills.append(f"$ grep -A3 '\"drills\"' ~/{folder}/exercises.json\n{found}")
        text = replace_block(text, "drills", fenced("\n".join(drills)))

        submissions = os.path.join(home, "submissions")
        make_class(submissions)
        graded = exercises_cli("grade", *[f"submissions/{n}" for n in sorted(os.listdir(submissions))], "--assignment",
                               "lm-loss", "top-k", "tensorflow-bugs", "--time-limit", "30", "--csv", "grades.csv",
                               "--gradescope-dir", "gradescope", cwd=home)
        graded = graded.replace(" ".join(f"submissions/{n}" for n in sorted(os.listdir(submissions))),
                                "submissions/*")
        with open(os.path.join(home, "grades.csv"), encoding="utf-8") as f:
            table = f.read()
        text = replace_block(text, "grade", fenced(graded) + "\n" + fenced(table, "csv"))
        with open(os.path.join(home, "gradescope", "alice", "results.json"), encoding="utf-8") as f:
            text = replace_block(text, "gradescope", fenced(f.read(), "json"))
    return text


def make_class(root):
    """Five folders as a class hands them in: two that did different work (one a drill), one untouched, one
    without exercises.json, one whose file does not parse; an endless loop in someone's function."""
    import exercises

    cli = [sys.executable, os.path.join(REPO, "tests", "exercises.py"), "start"]
    for name, names in (("alice", ["lm-loss", "top-k"]), ("bob", ["tensorflow-bugs", "--student", "Bob"]),
                        ("carol", ["lm-loss", "top-k"]), ("erin", ["lm-loss", "top-k"])):
        run([*cli, *names, "--out", os.path.join(root, name)], cwd=REPO)
    alice = os.path.join(root, "alice", "nanogpt2.py")
    with open(alice, encoding="utf-8") as f:
        mine = f.read()
    with open(alice, "w", encoding="utf-8") as f:
        f.write(exercises.restore(mine, exercises.read_repo_file("nanogpt2.py"), ["shifted_lm_loss"]))
    edit(alice, "top_k_filter", "    while True:  # waits for the k-th largest to turn up\n        pass\n")
    bob = os.path.join(root, "bob", "convert_tf.py")
    with open(bob, encoding="utf-8") as f:
        mine = f.read()
    with open(bob, "w", encoding="utf-8") as f:
        f.write(exercises.restore(mine, exercises.read_repo_file("convert_tf.py"),
                                  [exercises.BY_ID[exercises.drill("sstable", "Bob")]["edits"][0][0]]))
    os.makedirs(os.path.join(root, "dave"))
    shutil.copyfile(os.path.join(REPO, "nanogpt2.py"), os.path.join(root, "dave", "nanogpt2.py"))
    erin = os.path.join(root, "erin", "nanogpt2.py")
    with open(erin, encoding="utf-8") as f:
        mine = f.read()
    with open(erin, "w", encoding="utf-8") as f:
        f.write(mine.replace("def top_k_filter(logits", "def top_k_filter(logits,,", 1))


def main(argv):
    if not argv or argv[0] not in ("first-run", "exercises", "all"):
        raise SystemExit(__doc__)
    with open(README, encoding="utf-8") as f:
        text = f.read()
    if argv[0] in ("first-run", "all"):
        text = remake_first_run(text)
    if argv[0] in ("exercises", "all"):
        text = remake_exercises(text)
    tmp = README + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, README)
    print(f"rewrote {README}" + (" and docs/addition-attention.png" if argv[0] != "exercises" else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
