"""Seeded generators of kvsift's evaluation task families (issues 7, 18).

Both are plain text over a small character alphabet, so a character-level
tokenizer covers them.

needle: filler words with "the key is NNNNN." at a random depth, then
    "\\nq: what is the key?\\na: the key is " -> answer "NNNNN"
    (PyramidKV's needle-in-a-haystack, whose prompts also end by starting
    the answer sentence; exact match).

chain: a pointer-chasing problem that the model solves step by step,
    re-checking earlier steps verbatim (R-KV's target: a long chain of
    thought with redundancy), and whose answer needs a value stated at the
    very start:

        values: ab=17 cd=52 ...
        links: ab>cd cd>ef ...
        start: ab
        solve:
        ab>cd
        cd>ef
        ef>gh
        check cd>ef
        ...
        xy=73

    The prompt ends after "solve:\\n"; the model writes the rest. Following
    a link means finding "cd>" in the links line (far back), so keeping only
    recent tokens fails; the final value sits in the values line at the top.
    The solution ends when the current name has no link: it then writes the
    name's value. Every lookup is written the way the line it copies from
    writes it ("cd>" -> "ef", "xy=" -> "73"), so the model answers by
    matching the text it just wrote against the problem, as induction heads
    do.
"""
import random
import string

ALPHABET = string.digits + string.ascii_lowercase + " \n=>:?.,"
FILLER = (
    "the cat sat on a mat and the dog ran to the park while birds sang in old "
    "trees near a quiet river under grey sky with soft wind over green hills"
).split()


def needle(rng: random.Random, min_len=300, max_len=1500):
    """(prompt, answer) with a prompt of about min_len..max_len characters."""
    target = rng.randint(min_len, max_len)
    key = "".join(rng.choice(string.digits) for _ in range(5))
    words = []
    n = 0
    while n < target - 60:
        w = rng.choice(FILLER)
        words.append(w)
        n += len(w) + 1
    depth = rng.randint(0, len(words))
    words.insert(depth, f"the key is {key}.")
    prompt = " ".join(words) + "\nq: what is the key?\na: the key is "
    return prompt, key


def chain(rng: random.Random, hops_min=12, hops_max=30, distractors=8, check_every=3):
    """(prompt, solution) where the solution is the whole worked answer
    ending in 'xy=NN\\n'; the final answer is NN.

    Names are two letters. Every text a lookup matches is unique in the
    problem: the names ("ab>", "xy="), and also the three characters before
    each second character copied (no two links share "b>c", no two values
    share "y=7"), so a lookup never has two candidates that agree on the
    last three characters."""
    hops = rng.randint(hops_min, hops_max)
    pool = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    rng.shuffle(pool)
    used = set()
    link_keys = set()

    def next_name(src, candidates):
        for n in candidates:
            if n not in used and (src[1], n[0]) not in link_keys:
                return n
        raise RuntimeError("no name left")

    path = [pool[0]]
    used.add(pool[0])
    for _ in range(hops):
        n = next_name(path[-1], pool)
        link_keys.add((path[-1][1], n[0]))
        used.add(n)
        path.append(n)
    links = [(path[i], path[i + 1]) for i in range(hops)]
    # Distractor links start from names off the path and lead anywhere.
    off = [n for n in pool if n not in used][:distractors]
    used.update(off)
    names = path + off
    for d in off:
        targets = [n for n in rng.sample(names, len(names)) if n != d]
        t = next((n for n in targets if (d[1], n[0]) not in link_keys), None)
        if t is None:
            continue
        link_keys.add((d[1], t[0]))
        links.append((d, t))
    rng.shuffle(links)
    value_keys = set()
    values = {}
    for n in names:
        v = rng.choice([v for v in range(10, 100) if (n[1], v // 10) not in value_keys])
        value_keys.add((n[1], v // 10))
        values[n] = v
    vals = list(values.items())
    rng.shuffle(vals)
    prompt = (
        "values: " + " ".join(f"{k}={v}" for k, v in vals) + "\n"
        + "links: " + " ".join(f"{a}>{b}" for a, b in links) + "\n"
        + f"start: {path[0]}\nsolve:\n"
    )
    lines = []
    for i in range(hops):
        lines.append(f"{path[i]}>{path[i + 1]}")
        if (i + 1) % check_every == 0 and i > 0:
            # Re-check the step two back, verbatim: redundant, and fully
            # determined by the problem, so greedy decoding can get it right.
            j = i - 2 if i >= 2 else 0
            lines.append(f"check {path[j]}>{path[j + 1]}")
    # The last name has no link: its value is the answer.
    lines.append(f"{path[-1]}={values[path[-1]]}")
    return prompt, "\n".join(lines) + "\n"


CHECKS = ("check", "again", "sure", "recheck")


def tally(rng: random.Random, n_min=12, n_max=16, checks=CHECKS):
    """(prompt, solution) of the tally task (issue 18): R-KV's setting, a
    short problem behind a long, redundant trace.

        links: q7>d8 k2>m9 d8>z6 m9>q7 ...
        start: k2
        solve:
        k2>m9 s=1
        check k2>m9 s=1
        again k2>m9 s=1
        sure k2>m9 s=1
        recheck k2>m9 s=1
        m9>q7 s=8
        ...
        z6 end s=7

    A chain of n items (a letter and a digit each; letters distinct), its
    n - 1 links shuffled. Each step line follows one link and carries the
    running sum of the values so far (the start's included) mod 10; four
    verbatim re-checks follow it ("wait, let me verify"). The answer is the
    last letter and the final sum ("z7"). A step needs the unused links, the
    line above (item and sum) and nothing else: the check lines and old
    steps are redundant."""
    n = rng.randint(n_min, n_max)
    letters = rng.sample(string.ascii_lowercase, n)
    items = [f"{c}{rng.randint(0, 9)}" for c in letters]
    links = [(items[i], items[i + 1]) for i in range(n - 1)]
    rng.shuffle(links)
    prompt = (
        "links: " + " ".join(f"{a}>{b}" for a, b in links) + "\n"
        + f"start: {items[0]}\nsolve:\n"
    )
    s = int(items[0][1])
    lines = []
    for i in range(n - 1):
        s = (s + int(items[i + 1][1])) % 10
        step = f"{items[i]}>{items[i + 1]} s={s}"
        lines.append(step)
        lines.extend(f"{w} {step}" for w in checks)
    lines.append(f"{items[-1]} end s={s}")
    return prompt, "\n".join(lines) + "\n"


def answer_of(task: str, text: str) -> str:
    """The final answer a model wrote (what exact match compares)."""
    if task == "needle":
        return text.strip().split("\n")[0].strip()
    if task == "tally":
        for line in reversed(text.strip().split("\n")):
            parts = line.split()
            if len(parts) == 3 and parts[1] == "end" and parts[2].startswith("s="):
                return parts[0][:1] + parts[2][2:]
        return ""
    for line in reversed(text.strip().split("\n")):
        if "=" in line:
            return line.split("=", 1)[1].strip()
    return ""
