"""Seeded generators of kvsift's two evaluation task families (issue 7).

Both are plain text over a small character alphabet, so a character-level
tokenizer covers them.

needle: filler words with "the key is NNNNN." at a random depth, then
    "\\nq: what is the key?\\na: " -> answer "NNNNN" (PyramidKV's
    needle-in-a-haystack, exact match).

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
        end: xy
        ans=73

    The prompt ends after "solve:\\n"; the model writes the rest. Following
    a link means finding "cd>" in the links line (far back), so keeping only
    recent tokens fails; the final value sits in the values line at the top.
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
    prompt = " ".join(words) + "\nq: what is the key?\na: "
    return prompt, key


def _names(rng, n):
    pool = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    return rng.sample(pool, n)


def chain(rng: random.Random, hops_min=12, hops_max=30, distractors=8, check_every=3):
    """(prompt, solution) where the solution is the whole worked answer
    ending in 'ans=NN\\n'; the final answer is the last line."""
    hops = rng.randint(hops_min, hops_max)
    names = _names(rng, hops + 1 + distractors)
    path = names[: hops + 1]
    values = {n: rng.randint(10, 99) for n in names}
    links = [(path[i], path[i + 1]) for i in range(hops)]
    # Distractor links start from names off the path.
    for d in names[hops + 1 :]:
        links.append((d, rng.choice(names)))
    rng.shuffle(links)
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
    lines.append(f"end: {path[-1]}")
    lines.append(f"ans={values[path[-1]]}")
    return prompt, "\n".join(lines) + "\n"


def answer_of(task: str, text: str) -> str:
    """The final answer a model wrote (what exact match compares)."""
    if task == "needle":
        return text.strip().split("\n")[0].strip()
    for line in reversed(text.strip().split("\n")):
        if line.startswith("ans="):
            return line[4:].strip()
    return ""
