"""GPT-2's byte-level BPE written out in nanogpt2.py (Part III, "Tokenizer"), proven against tiktoken, and BPE
training on your own text (train_bpe, `train --tokenizer bpe`, `tokenize`).

- The written-out encoder gives tiktoken's tokens on arbitrary text (hypothesis: letters of every script, digits
  of every kind, emoji, combining marks, contractions in both cases, whitespace runs of every kind, <|endoftext|>
  inside text, lone surrogates) and on every file of this repository; its pre-tokenizer cuts single characters of
  every class where tiktoken's regex cuts them (probed with a vocabulary made for the purpose).
- train_bpe's incremental counts give the merges of the definition (count every pair, merge the most frequent,
  ties to the bytes that sort first), computed from scratch each round here; a trained BPE encodes as tiktoken
  does with the same merges, and its file round-trips (GPT-2's own vocab.bpe is written back byte for byte).
- The command line trains, samples, evaluates and resumes with its own tokenizer; bad input is one line.
"""

import collections
import json
import os
import pathlib
import unicodedata

import pytest
import regex  # tiktoken's own dependency: its pattern, as tiktoken's Python side runs it
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

import nanogpt2
from helpers import examples

ROOT = pathlib.Path(__file__).resolve().parent.parent
THOROUGH = settings.default.max_examples > 25  # HYPOTHESIS_PROFILE=thorough: the deeper checks
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4"]


def ours():
    return nanogpt2.get_tokenizer("python")


def tiktokens():
    return nanogpt2.get_tokenizer()


# --- What arbitrary text is made of -------------------------------------------------------------------

# Whitespace of every kind, and characters that look like it but are not Unicode White_Space: \x1c-\x1f (Python's
# str.isspace() and re's \s say they are), U+180E, U+200B (zero-width space), U+FEFF.
SPACES = nanogpt2.WHITESPACE + "\x1c\x1d\x1e\x1f\u180e\u200b\ufeff"
NEWER = [int(span.split("-")[0], 16) for span in (nanogpt2.NEWER_LETTERS + " " + nanogpt2.NEWER_NUMBERS).split()]
fragments = st.one_of(
    st.characters(),  # any code point but a surrogate, assigned or not
    st.text(st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]), min_size=1, max_size=8),  # letters, any script
    st.text(st.characters(categories=["Nd", "Nl", "No"]), min_size=1, max_size=6),  # digits and numbers of any kind
    st.text(st.characters(categories=["Mn", "Mc", "Me"]), min_size=1, max_size=3),  # combining marks
    st.text(st.characters(categories=["P", "S"]), min_size=1, max_size=4),  # punctuation and symbols
    st.text(st.sampled_from(SPACES), min_size=1, max_size=8),  # whitespace runs of every kind, and look-alikes
    st.sampled_from(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'LL", "'D", "'M", "’s",
                     "'", "''", "'x"]),  # contractions in both cases, and near misses
    # emoji, with skin tones, joined into families, flags, a variation selector
    st.sampled_from(["🙂", "👍🏽", "👩‍👩‍👧", "🇫🇷", "❤️", "🦙", "🫠", "\U0001f9d1\u200d\U0001f4bb"]),
    st.sampled_from(["<|endoftext|>", "<|endoftext", "|>", "<|", "endoftext"]),  # the special token, and pieces of it
    st.sampled_from([" Hello", " world", "naïve", " 東京", " 2019", "1,000", " ½", "٣٤", "e\u0301", " ", "  ",
                     "\n", "\r\n", "\t"]),
    st.sampled_from(NEWER).map(chr),  # a letter or number that Python's unicodedata may not know yet
    st.characters(categories=["Cs"]),  # a lone surrogate (which tiktoken repairs)
    st.integers(0, 10 ** 12).map(str),
)
texts = st.lists(fragments, max_size=40).map("".join)


@examples(200)
@given(texts)
def test_written_out_encoder_gives_tiktokens_tokens_on_arbitrary_text(text):
    py, tk = ours(), tiktokens()
    ids = tk.encode(text, allowed_special="all")
    assert py.encode(text, allowed_special="all") == ids
    assert py.encode(text, allowed_special={"<|endoftext|>"}) == ids
    assert py.encode_ordinary(text) == tk.encode_ordinary(text)
    assert py.encode(text, disallowed_special=()) == tk.encode(text, disallowed_special=())
    if "<|endoftext|>" in text:  # not allowed by default: an error in both
        with pytest.raises(ValueError):
            tk.encode(text)
        with pytest.raises(ValueError, match="special token not allowed"):
            py.encode(text)
    else:
        assert py.encode(text) == ids
    assert py.decode(ids) == tk.decode(ids)
    assert py.decode(ids) == nanogpt2.valid_unicode(text)  # (the text itself, but for repaired surrogates)
    assert "".join(piece for piece, _ in py.pieces(text)) == nanogpt2.valid_unicode(text)
    assert [i for _, piece_ids in py.pieces(text) for i in piece_ids] == ids


@examples(100)
@given(st.lists(st.integers(0, nanogpt2.EOT_TOKEN), max_size=30))
def test_any_tokens_decode_as_tiktoken_decodes_them(ids):
    assert ours().decode(ids) == tiktokens().decode(ids)
    assert ours().decode_bytes(ids) == tiktokens().decode_bytes(ids)


def test_every_token_has_tiktokens_bytes():
    py, tk = ours(), tiktokens()
    assert py.n_vocab == tk.n_vocab == 50257 and py.eot_token == tk.eot_token == nanogpt2.EOT_TOKEN
    assert [py.decode_single_token_bytes(i) for i in range(py.n_vocab)] == \
        [tk.decode_single_token_bytes(i) for i in range(tk.n_vocab)]


def repository_files():
    skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "out", "gpu-out"}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        for name in sorted(files):
            yield pathlib.Path(folder) / name


def test_every_file_of_the_repository_encodes_as_tiktoken_encodes_it():
    py, tk = ours(), tiktokens()
    count = 0
    for path in repository_files():
        text = path.read_bytes().decode("utf-8", errors="replace")  # the PNG and TF fixtures too, as text
        assert py.encode(text, allowed_special="all") == tk.encode(text, allowed_special="all"), path
        count += 1
    assert count > 40


# --- The pre-tokenizer, character by character ----------------------------------------------------------

PROBES = {"letter": "a", "number": "1", "other": "!", "space": "\t"}


def tiktoken_joins(strings):
    """For each string, whether tiktoken's own regex (GPT-2's pattern, in Rust) keeps it as one piece. A vocabulary
    made for the purpose holds the 256 bytes and every prefix of every string, so a string is one token exactly
    when it is one piece (tokens never cross pieces)."""
    joined = []
    for batch in range(0, len(strings), 50_000):  # (a vocabulary of a few hundred thousand tokens at a time)
        ranks = {bytes([b]): b for b in range(256)}
        for s in strings[batch: batch + 50_000]:
            raw = s.encode("utf-8")
            for k in range(2, len(raw) + 1):
                ranks.setdefault(raw[:k], len(ranks))
        probe = tiktoken.Encoding("probe", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
        joined += [len(probe.encode_ordinary(s)) == 1 for s in strings[batch: batch + 50_000]]
    return joined


def test_every_kind_of_character_is_cut_where_tiktoken_cuts_it():
    """Each character after a letter, a number, a symbol and a tab: one piece with it, or two, as tiktoken's regex
    decides. The characters: every letter and number that Unicode 15.0-16.0 added (NEWER_LETTERS, NEWER_NUMBERS),
    every whitespace and look-alike, and every 89th code point (every one under HYPOTHESIS_PROFILE=thorough)."""
    chosen = set(NEWER_CODE_POINTS)
    chosen |= {ord(c) for c in SPACES} | set(range(0x80, 0x110000, 1 if THOROUGH else 89))
    characters = [chr(cp) for cp in sorted(chosen) if unicodedata.category(chr(cp)) != "Cs"]
    strings = [before + c for c in characters for before in PROBES.values()]
    joined = dict(zip(strings, tiktoken_joins(strings)))
    wrong = [(f"U+{ord(s[1]):04X}", kind) for kind, before in PROBES.items() for s in (before + c for c in characters)
             if (nanogpt2.split_into_pieces(s) == [s]) != joined[s]]
    assert not wrong, f"{len(wrong)} characters cut unlike tiktoken, e.g. {wrong[:10]}"
    assert len(characters) > 20_000


@pytest.mark.parametrize("text, pieces", [
    ("it's IT'S", ["it", "'s", " IT", "'", "S"]),  # contractions are lower case only
    ("a   b", ["a", "  ", " b"]),  # a whitespace run leaves its last space to the word after it
    ("a \n b", ["a", " \n", " b"]),
    ("a\n\nb", ["a", "\n", "\n", "b"]),  # ... but a newline before a word stays on its own
    ("x  ", ["x", "  "]),  # a run that ends the text stays whole
    ("a\u3000b", ["a", "\u3000", "b"]),  # only U+0020 joins a word; other spaces are pieces of their own
    ("a\x1cb", ["a", "\x1c", "b"]),  # \x1c is no whitespace (Python's isspace() says it is): a symbol
    ("2019年 ½٣", ["2019", "年", " ½٣"]),
    ("👍🏽!? ok", ["👍🏽!?", " ok"]),
])
def test_the_pieces_of_gpt2s_pattern(text, pieces):
    got = nanogpt2.split_into_pieces(text)
    assert got == pieces, pieces_message(text, got, pieces)


def pieces_message(text, got, expected):
    """A wrong cut in plain words: the text, the pieces got and expected, and the first piece that differs."""
    first = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
    return (f"split_into_pieces({text!r}) gave the wrong pieces:\n"
            f"    got:      {got!r}\n"
            f"    expected: {expected!r}  (GPT-2's pattern, as tiktoken cuts the text)\n"
            f"    the first difference is piece {first}: got {got[first] if first < len(got) else 'nothing'!r}, "
            f"expected {expected[first] if first < len(expected) else 'nothing'!r}")


# tiktoken's own pattern for GPT-2 (possessive quantifiers, \p{L} and \p{N}), run by the regex module as tiktoken's
# Python side runs it. The regex module may know a newer Unicode than tiktoken's Rust regex (16.0): the texts below
# keep only characters that this Python's unicodedata or NEWER_LETTERS / NEWER_NUMBERS know, on which the three
# agree (test_every_kind_of_character_is_cut_where_tiktoken_cuts_it checks the Rust side, character by character).
GPT2_PATTERN = regex.compile(r50k_pat_str)
NEWER_CODE_POINTS = frozenset(cp for span in (nanogpt2.NEWER_LETTERS + " " + nanogpt2.NEWER_NUMBERS).split()
                              for cp in range(int(span.split("-")[0], 16), int(span.split("-")[-1], 16) + 1))


def known_characters(text):
    return "".join(c for c in text if unicodedata.category(c) != "Cn" or ord(c) in NEWER_CODE_POINTS)


known_texts = texts.map(known_characters)


@examples(100)
@given(known_texts)
def test_split_into_pieces_cuts_text_where_tiktokens_own_pattern_cuts_it(text):
    expected = GPT2_PATTERN.findall(text)
    got = nanogpt2.split_into_pieces(text)
    assert got == expected, pieces_message(text, got, expected)


def test_merge_loop_merges_the_lowest_rank_first_and_the_leftmost_of_equals():
    a, b, ab, bb = 0, 1, 2, 3
    ranks = {b"a": a, b"b": b, b"ab": ab, b"bb": bb}
    for piece, expected, why in ((b"abb", [ab, b], '"ab" (rank 2) merges before "bb" (rank 3)'),
                                 (b"bbb", [bb, b], 'of two "bb" of the same rank, the leftmost merges first'),
                                 (b"ab", [ab], "a piece that is one token"),
                                 (b"ba", [b, a], '"ba" is no token: nothing merges'),
                                 (b"", [], "an empty piece has no tokens")):
        got = nanogpt2.merge_piece(piece, ranks)
        assert got == expected, (f"merge_piece({piece!r}, ranks={ranks}) gave {got}, expected {expected}: {why}")


def tiktokens_pieces(text):
    """[(piece, tiktoken's token ids for it)] of text: the pieces of tiktoken's pattern, and tiktoken's tokens of the
    whole text cut where each piece's bytes end (tokens never cross pieces)."""
    tk = tiktokens()
    ids, at, pieces = tk.encode_ordinary(text), 0, []
    for piece in GPT2_PATTERN.findall(text):
        left, piece_ids = len(piece.encode("utf-8")), []
        while left > 0:
            piece_ids.append(ids[at])
            left -= len(tk.decode_single_token_bytes(ids[at]))
            at += 1
        assert left == 0, f"a token of tiktoken's crosses the end of the piece {piece!r}: the test is wrong"
        pieces.append((piece, piece_ids))
    assert at == len(ids)
    return pieces


def shown_tokens(ids):
    """Token ids with their bytes, for a message: [18435 b' Hello', 0 b'!']."""
    try:
        return "[" + ", ".join(f"{i} {ours().decode_single_token_bytes(i)!r}" for i in ids) + "]"
    except Exception:  # not a list of token ids: shown as it is
        return repr(ids)


@examples(100)
@given(known_texts)
@example("Zzzz... Aaaaah!!!!!! 2222")  # pieces that hold the same pair twice or more: the leftmost merges first
def test_merge_piece_gives_tiktokens_tokens_for_every_piece(text):
    """Each piece of the text (cut by tiktoken's own pattern) merged with GPT-2's ranks: tiktoken's tokens."""
    ranks = ours().ranks
    for piece, expected in tiktokens_pieces(nanogpt2.valid_unicode(text)):
        got = nanogpt2.merge_piece(piece.encode("utf-8"), ranks)
        assert got == expected, (f"merge_piece({piece.encode('utf-8')!r}, GPT-2's ranks), the piece {piece!r} of "
                                 f"the text, gave\n    {shown_tokens(got)}\nbut tiktoken's tokens for it are\n"
                                 f"    {shown_tokens(expected)}\n(a token's id is its rank: the lower, the earlier its merge)")


# --- Special tokens, bad arguments ----------------------------------------------------------------------


def test_special_tokens_are_handled_as_tiktokens_allowed_special():
    py, tk = ours(), tiktokens()
    text = "a<|endoftext|>b"
    assert py.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert py.encode(text, allowed_special={"<|unknown|>"}, disallowed_special=()) == tk.encode(
        text, allowed_special={"<|unknown|>"}, disallowed_special=())
    with pytest.raises(ValueError, match=r"holds '<\|endoftext\|>' \(at character 1\), a special token not allowed"):
        py.encode(text)
    with pytest.raises(TypeError, match="encode takes a str"):
        py.encode(b"bytes")
    with pytest.raises(ValueError, match=r"token ids are integers in \[0, 50257\)"):
        py.decode_single_token_bytes(50257)
    with pytest.raises(ValueError, match=r"ids\[1\] is -1"):
        py.decode([1, -1])
    with pytest.raises(ValueError, match='kind is "tiktoken" \\(the default\\) or "python"'):
        nanogpt2.get_tokenizer("rust")


# --- The merges file ------------------------------------------------------------------------------------


def test_gpt2s_vocab_bpe_is_read_and_written_back_byte_for_byte(tmp_path):
    path = nanogpt2.gpt2_merges_file()
    merges = nanogpt2.read_merges(path, sha256=nanogpt2.GPT2_MERGES_SHA256)
    assert len(merges) == 50_000 and merges[0] == (b" ", b"t") and merges[2] == (b"h", b"e")
    nanogpt2.write_merges(tmp_path / "merges.txt", merges)
    assert (tmp_path / "merges.txt").read_bytes() == pathlib.Path(path).read_bytes()


@pytest.mark.parametrize("contents, message", [
    (b"", "must begin with the line '#version: 0.2'"),
    (b"\xef\xbb\xbf#version: 0.2\nh e\n", "must begin with the line '#version: 0.2'"),
    (b"#version: 0.2\nh e", "end with a newline"),
    (b"#version: 0.2\nh e\nhe  llo\n", "line 3, 'he  llo', is not two tokens separated by one space"),
    (b"#version: 0.2\nh e r\n", "line 2, 'h e r', is not two tokens"),
    (b"#version: 0.2\nh e\n\n", "line 3, '', is not two tokens"),
    (b"#version: 0.2\nh \xc3\xa9\xe2\x82\xac\n", "line 2, 'h é€', is not two tokens"),  # € is no byte symbol
    (b"#version: 0.2\nh\xff e\n", "byte 15 is not UTF-8"),
    (b"#version: 0.2\nh e\nhe llo\n", "line 3, 'he llo', is impossible: its right side is no token yet"),
    (b"#version: 0.2\nh e\nh e\n", "line 3, 'h e', is impossible: an earlier merge made the same token"),
])
def test_a_damaged_merges_file_is_one_line_naming_it_and_the_line(tmp_path, contents, message):
    path = tmp_path / "merges.txt"
    path.write_bytes(contents)
    with pytest.raises(ValueError) as error:
        nanogpt2.read_merges(path)
    assert str(error.value).startswith(f"{path} is damaged") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_huge_merges_file_is_refused_unread(tmp_path):
    path = tmp_path / "merges.txt"
    path.write_bytes(b"#version: 0.2\n")
    with open(path, "ab") as f:
        f.truncate(nanogpt2.MAX_MERGES_BYTES + 10)  # sparse: no disk used
    with pytest.raises(ValueError, match="is over 64 MB"):
        nanogpt2.read_merges(path)


def test_a_changed_vocab_bpe_is_refused_by_its_sha256(tmp_path):
    path = tmp_path / "vocab.bpe"
    path.write_bytes(pathlib.Path(nanogpt2.gpt2_merges_file()).read_bytes().replace(b"\nh e\n", b"\ne h\n"))
    with pytest.raises(ValueError, match="is damaged: its SHA-256 is not 1ce1664773"):
        nanogpt2.read_merges(path, sha256=nanogpt2.GPT2_MERGES_SHA256)


# --- Training -------------------------------------------------------------------------------------------


def naive_training(text, rounds):
    """BPE training from its definition, with nothing kept between rounds: every piece's tokens as bytes, every
    pair counted again each round (times the piece's count), the most frequent merged (ties: the pair whose bytes
    sort first), which must occur twice. A merge whose bytes are a token already makes no new token. Returns the
    new tokens' merges, in order."""
    pieces = collections.Counter()
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # tiktoken's repair of surrogates
    for segment in text.split("<|endoftext|>"):
        pieces.update(nanogpt2.split_into_pieces(segment))
    words = {tuple(bytes([b]) for b in piece.encode("utf-8")): count for piece, count in pieces.items()}
    known, merges = {bytes([b]) for b in range(256)}, []
    for _ in range(rounds):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs or max(pairs.values()) < 2:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i: i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def trained_merges(text, limit=400):
    """train_bpe's rounds until no pair occurs twice (or limit), through PairCounts as train_bpe runs them."""
    counts, merges = nanogpt2.PairCounts(nanogpt2.count_pieces(text)), []
    for _ in range(limit):
        pair = counts.best_pair()
        if pair is None:
            break
        _, new = counts.merge(pair)
        if new:
            merges.append((counts.tokens[pair[0]], counts.tokens[pair[1]]))
    return merges


small_texts = st.lists(st.one_of(st.text("ab ", max_size=12), st.text("abcxyz\n'0123 ", max_size=30), fragments),
                       max_size=20).map("".join)


@examples(100)
@given(small_texts)
def test_incremental_training_gives_the_merges_of_the_definition(text):
    merges = trained_merges(text)
    assert merges == naive_training(text, 400)[:len(merges)]
    if len(merges) < 400:  # ran out: the definition runs out at the same merge
        assert len(naive_training(text, 400)) == len(merges)


@examples(100)
@given(st.lists(st.integers(0, 3), max_size=12), st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_merge_pair_replaces_each_occurrence_from_left_to_right(word, pair):
    """merge_pair against bytes.replace, which replaces from left to right, never overlapping (token ids 0-3 and the
    new token 9 as bytes)."""
    before = list(word)
    expected = list(bytes(word).replace(bytes(pair), bytes([9])))
    got = nanogpt2.merge_pair(word, pair, 9)
    assert got == expected, f"merge_pair({before}, {pair}, 9) gave {got}, expected {expected}"
    assert word == before, f"merge_pair({before}, {pair}, 9) changed the list it was given into {word}"


def replaced(word, pair, new_id):
    """word with each occurrence of pair replaced by new_id, from the left, never overlapping (the definition)."""
    out, i = [], 0
    while i < len(word):
        if tuple(word[i: i + 2]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def times(n):
    return f"{n} time" if n == 1 else f"{n} times"


def pair_counts_of(counts):
    """Every adjacent pair of counts.words counted again from scratch, each occurrence counting its word's count."""
    pairs = collections.Counter()
    for word, count in zip(counts.words, counts.counts):
        for pair in zip(word, word[1:]):
            pairs[pair] += count
    return pairs


@examples(50)
@given(small_texts)
@example("ab ab ba ba")  # a tie in the first round, of pairs that occur exactly twice
def test_each_round_merges_the_most_frequent_pair_and_counts_the_pairs_again(text):
    """Training one round at a time, against the definition: best_pair() is the most frequent pair of the words as
    they are now (ties: the left token's bytes, then the right's, sort first; None when no pair occurs twice), and
    after merge(pair) every word holds the new token where it held the pair (from the left, never overlapping)
    and the counts of pairs are those of the words counted again."""
    counts = nanogpt2.PairCounts(nanogpt2.count_pieces(text))

    def shown(pair):
        return None if pair is None else tuple(counts.tokens[t] for t in pair)

    for round in range(1, 81):
        pairs = pair_counts_of(counts)
        best = min(pairs, key=lambda p: (-pairs[p], counts.tokens[p[0]], counts.tokens[p[1]]), default=None)
        expected = best if best is not None and pairs[best] >= 2 else None
        got = counts.best_pair()
        assert got == expected, (
            f"round {round}: best_pair() gave {shown(got)}" + (f" (it occurs {times(pairs[got])})" if got else "") +
            f", but the pair to merge is {shown(expected)}" + (f" ({times(pairs[expected])})" if expected else
                                                               " (no pair occurs twice)") +
            f"; the most frequent pairs now: {[(shown(p), n) for p, n in pairs.most_common(4)]}")
        if expected is None:
            break
        words = [list(word) for word in counts.words]
        token_id, _ = counts.merge(expected)
        assert counts.tokens[token_id] == counts.tokens[expected[0]] + counts.tokens[expected[1]], (
            f"round {round}: merge({shown(expected)}) returned token {token_id}, whose bytes are "
            f"{counts.tokens[token_id]!r}")
        for word, now in zip(words, counts.words):
            merged = replaced(word, expected, token_id)
            assert list(now) == merged, (
                f"round {round}: merge({shown(expected)}) made the word {[counts.tokens[t] for t in word]} "
                f"{[counts.tokens[t] for t in now]}, expected {[counts.tokens[t] for t in merged]}")
        pairs = pair_counts_of(counts)
        kept = {pair: n for pair, n in counts.pairs.items() if n}
        wrong = sorted((pair for pair in set(pairs) | set(kept) if pairs.get(pair, 0) != kept.get(pair, 0)),
                       key=lambda p: (counts.tokens[p[0]], counts.tokens[p[1]]))
        assert not wrong, (
            f"round {round}: after merge({shown(expected)}), {len(wrong)} pair counts are wrong; e.g. "
            + "; ".join(f"{shown(p)} is counted {times(kept.get(p, 0))}, but the words hold it {times(pairs.get(p, 0))}"
                        for p in wrong[:3]))


def test_ties_go_to_the_pair_whose_bytes_sort_first():
    # "ab", " ab", " ba", " ba": (" ", "b"), ("a", "b") and ("b", "a") each occur twice; b" b" < b"ab" < b"ba".
    assert nanogpt2.train_bpe("ab ab ba ba", 258).merges == [(b" ", b"b")]
    # Then (" b", "a") and ("a", "b") occur twice each: b" b" < b"a".
    assert nanogpt2.train_bpe("ab ab ba ba", 260).merges == [(b" ", b"b"), (b" b", b"a"), (b"a", b"b")]


def test_the_text_endoftext_separates_documents_and_is_never_learnt():
    # Learnt as text, "<|" would come first: (b"<", b"|") occurs as often as (b"a", b"b") and sorts before it.
    assert nanogpt2.train_bpe("ab<|endoftext|>" * 10, 258).merges == [(b"a", b"b")]
    with pytest.raises(ValueError, match="after 1 merges no pair of tokens occurs twice"):
        nanogpt2.train_bpe("ab<|endoftext|>" * 10, 259)


def trained_tiktoken(bpe):
    ranks = {token: i for i, token in enumerate(bpe.tokens[:-1])}
    return tiktoken.Encoding("trained", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": bpe.eot_token})


@examples(50)
@given(small_texts, texts)
def test_a_trained_bpe_encodes_as_tiktoken_encodes_with_its_merges(training, text):
    bpe = nanogpt2.train_bpe(training, 257 + len(trained_merges(training, 60)))
    tk = trained_tiktoken(bpe)
    assert bpe.encode(text, allowed_special="all") == tk.encode(text, allowed_special="all")
    assert bpe.encode(training, allowed_special="all") == tk.encode(training, allowed_special="all")
    assert bpe.decode(bpe.encode(text, allowed_special="all")) == nanogpt2.valid_unicode(text)


def test_training_on_a_file_equals_training_on_its_text_and_compresses_it(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    path = tmp_path / "readme.txt"
    path.write_text(text, encoding="utf-8")
    from_file = nanogpt2.train_bpe(path, 600)
    assert from_file.merges == nanogpt2.train_bpe(text, 600).merges and len(from_file.merges) == 600 - 257
    assert from_file.n_vocab == 600 and from_file.eot_token == 599
    assert len(text.encode("utf-8")) / len(from_file.encode(text, disallowed_special=())) > 1.8  # bytes per token
    tk = trained_tiktoken(from_file)
    assert from_file.encode(text, disallowed_special=()) == tk.encode(text, disallowed_special=())


def test_vocab_sizes_that_cannot_be_are_one_line_naming_the_argument(tmp_path):
    for bad in (256, 0, True, 300.0):
        with pytest.raises(ValueError, match=r"vocab_size must be an integer of at least 257 \(the 256 byte tokens"):
            nanogpt2.train_bpe("some text", bad)
    with pytest.raises(ValueError, match="--vocab-size 100000 is more than the text supports: its 2 different pieces "
                                         "allow at most 4 merges"):
        nanogpt2.train_bpe("hello world", 100_000, option="--vocab-size")
    # "ab", " ab", " cd": at most (1 + 2 + 2) // 2 = 2 merges by the count of pairs, but only ("a", "b") occurs twice
    with pytest.raises(ValueError, match="vocab_size 259 is more than the text supports: after 1 merges no pair of "
                                         "tokens occurs twice within a piece, so it supports at most 258 tokens"):
        nanogpt2.train_bpe("ab ab cd", 259)
    bad_file = tmp_path / "latin1.txt"
    bad_file.write_bytes(b"plain ascii, then caf\xe9\n")
    with pytest.raises(ValueError, match=f"{bad_file} is not UTF-8 text: byte 21 "):
        nanogpt2.train_bpe(bad_file, 300)


@pytest.mark.parametrize("contents, offset", [(b"\xff", 0), (b"abc\xc3", 3), (b"\xc3\xa9\xe2\x82", 2),
                                              (b"x" * (1 << 20) + b"\xe2\x82\xac\xe2\x28", (1 << 20) + 3),
                                              (b"x" * ((1 << 20) - 1) + b"\xe2\x82\xac\xff", (1 << 20) + 2)],
                         ids=["first", "cut-short", "cut-short-later", "after-1MB", "euro-across-the-1MB-read"])
def test_the_first_bad_utf8_byte_is_found_across_the_reads(tmp_path, contents, offset):
    path = tmp_path / "f"
    path.write_bytes(contents)
    assert nanogpt2.first_bad_utf8_byte(path) == offset
    path.write_bytes(contents[:offset])
    assert nanogpt2.first_bad_utf8_byte(path) is None


@examples(30)
@given(small_texts, texts)
def test_streaming_a_trained_bpe_equals_decoding_it(training, text):
    bpe = nanogpt2.train_bpe(training, 257 + len(trained_merges(training, 40)))
    ids = bpe.encode(text, allowed_special="all")
    stream = nanogpt2.StreamDecoder(bpe=bpe)
    assert "".join(stream(i) for i in ids) + stream.flush() == bpe.decode(ids)


# --- The command line -----------------------------------------------------------------------------------

CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog; it's {i * 7 % 13} o'clock.\n"
                 for i in range(80))


def run_error(capsys, argv):
    assert nanogpt2.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogpt2.py: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_train_with_its_own_bpe_samples_evaluates_and_resumes_with_it(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(out),
            "--max-steps", "4", "--eval-every", "2"]
    assert nanogpt2.main([*argv, "--stop-at", "2"]) == 0
    assert "training a BPE of 300 tokens on" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["bpe_merges"] == "merges.txt" and config["eos_token_id"] == 299
    bpe = nanogpt2.BytePairEncoding(nanogpt2.read_merges(out / "merges.txt"))
    assert bpe.merges == nanogpt2.train_bpe(corpus, 300).merges
    tokens = (out / "tokens.bin").read_bytes()
    assert tokens == bytes(memoryview(__import__("numpy").asarray(bpe.encode(CORPUS), dtype="uint16")))
    assert nanogpt2.main(["train", "--resume", str(out)]) == 0  # resumes with the same tokenizer, tokens unchanged
    assert (out / "tokens.bin").read_bytes() == tokens
    assert "merges.txt (its tokenizer)" in capsys.readouterr().out
    assert nanogpt2.main(["sample", "--model", str(out), "--prompt", "Line 3: the", "--max-new-tokens", "5",
                          "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Line 3: the")
    assert nanogpt2.main(["eval", "--model", str(out), "--data", str(corpus), "--context", "16"]) == 0
    printed = capsys.readouterr().out
    assert "(a BPE of 300 tokens trained on the text)" in printed and "bits per byte of text" in printed
    assert nanogpt2.main(["tokenize", "--model", str(out), "--text", "Line 12: the lazy dog"]) == 0
    printed = capsys.readouterr().out
    assert "a BPE of 300 tokens trained on the text: 300 tokens" in printed
    assert f"ids: {bpe.encode('Line 12: the lazy dog')}" in printed
    (out / "merges.txt").write_text("#version: 0.2\nh e\nh e\n", encoding="utf-8")
    err = run_error(capsys, ["sample", "--model", str(out), "--prompt", "x", "--max-new-tokens", "1"])
    assert f"{out / 'merges.txt'} is damaged" in err and "line 3" in err
    nanogpt2.write_merges(out / "merges.txt", bpe.merges[:10])
    err = run_error(capsys, ["eval", "--model", str(out), "--data", str(corpus)])
    assert "makes 267 tokens (10 merges), but the model in" in err and "has a vocabulary of 300" in err
    (out / "merges.txt").unlink()
    assert "merges.txt is missing" in run_error(capsys, ["tokenize", "--model", str(out), "--text", "x"])
    os.symlink(tmp_path / "corpus.txt", out / "merges.txt")
    assert "outside" in run_error(capsys, ["tokenize", "--model", str(out), "--text", "x"])


@pytest.mark.parametrize("options, message", [
    (["--vocab-size", "256"],
     "argument --vocab-size: must be at least 257 (256 byte tokens and <|endoftext|>), got 256"),
    (["--vocab-size", "5000"], "--vocab-size 5000 is more than {corpus} supports"),
    (["--tokenizer", "char", "--vocab-size", "300"], "--vocab-size is the size of a BPE learnt from --data: it goes "
                                                     "with --tokenizer bpe"),
])
def test_bad_bpe_options_are_one_line(tmp_path, capsys, options, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello there. " * 4, encoding="utf-8")
    argv = ["train", "--data", str(corpus), "--tokenizer", "bpe", *options, "--out", str(tmp_path / "o")]
    if options[0] == "--vocab-size" and options[1] == "256":
        with pytest.raises(SystemExit):
            nanogpt2.main(argv)
        assert message in capsys.readouterr().err
        return
    assert message.format(corpus=corpus) in run_error(capsys, argv)
    assert not os.path.exists(tmp_path / "o")  # a run that fails before it trains leaves no folder


def test_a_non_utf8_or_empty_file_names_the_file_and_the_byte(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("naïve text\n".encode("utf-8") * 3 + "café\n".encode("latin-1"))
    err = run_error(capsys, ["train", "--data", str(latin1), "--tokenizer", "bpe", "--out", str(tmp_path / "o")])
    assert f"{latin1} is not UTF-8 text: byte 39 (counting from 0)" in err
    assert f"{latin1} is not UTF-8 text: byte 39" in run_error(capsys, ["tokenize", "--file", str(latin1)])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert f"--data {empty} is empty" in run_error(capsys, ["train", "--data", str(empty), "--tokenizer", "bpe"])


def test_tokenize_shows_pieces_ids_and_the_bytes_of_split_characters(tmp_path, capsys):
    assert nanogpt2.main(["tokenize", "--text", "Hello 東京<|endoftext|>"]) == 0
    printed = capsys.readouterr().out
    assert "GPT-2's BPE (written out; tiktoken's tokens): 50,257 tokens" in printed
    assert "21 characters, 25 bytes -> 3 pieces -> 7 tokens" in printed
    assert "15496 'Hello'" in printed and "50256 '<|endoftext|>'" in printed
    assert "10545 b' \\xe6'  251 b'\\x9d'" in printed and "b'...': a token whose bytes are not whole UTF-8" in printed
    assert f"ids: {nanogpt2.encode('Hello 東京<|endoftext|>')}" in printed
    path = tmp_path / "t.txt"
    path.write_text("one two three four five", encoding="utf-8")
    assert nanogpt2.main(["tokenize", "--file", str(path), "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "' two'" in printed and "' three'" not in printed and "... and 3 more pieces (--limit 0" in printed
