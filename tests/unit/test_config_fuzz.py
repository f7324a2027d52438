"""Config fuzz: seeded random YAML files and overrides each give a valid config (exit 0) or one line (exit 2).

Documents mix known keys with wrong types, NaN/inf, numbers beyond float's range, deep nesting, unknown keys,
broken YAML and non-UTF-8 bytes. A valid result must also survive a round trip through `raylm config`'s output.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import yaml

from raylm.cli import main
from raylm.config import resolve, to_dict
from raylm.config.loader import describe_fields, read_yaml
from tests.conftest import TINY_CONFIG

DOCUMENTS = 500
DEFAULTS = {name: default for name, _, default in describe_fields()}
KEYS = list(DEFAULTS)
ODD_FLOATS = [".nan", ".inf", "-.inf", "1e400", str(10**400), "-0.0", "1e-320", "3e-4"]


def plausible(rng: random.Random, default):
    """A value of the key's own type near its default: most such documents should be valid."""
    if isinstance(default, bool):
        return rng.choice([True, False])
    if isinstance(default, int):
        return rng.choice([default, default * 2, max(1, default // 2), 1, 0, -1, 2**70])
    if isinstance(default, float):
        return rng.choice([default, default * 2, default / 2, 0.0, float("nan"), float("inf"), -1.0])
    return default


def random_scalar(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([0, 1, 2, 3, 4, 8, 16, -1, 10**30, 2**63])
    if kind == 1:
        return rng.choice([0.5, -2.5, 1e-3, float("nan"), float("inf"), 1e300])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(
            ["", "tiny", "a/b", "../x", "/abs", "s3://b/p", "ü日本", "auto", "cosine", "fp32", "0"]
        )
    if kind == 4:
        return [random_scalar(rng) for _ in range(rng.randrange(3))]
    if kind == 5:
        return {rng.choice(["path", "weight", "x"]): random_scalar(rng) for _ in range(rng.randrange(3))}
    if kind == 6:
        return nested(rng.randrange(1, 60))
    return rng.choice([1, 2, 4, 1e-4, 0.02, "gloo", "never"])


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def random_tree(rng: random.Random, base: dict) -> dict:
    tree = copy.deepcopy(base)
    for _ in range(rng.randrange(4)):
        dotted = (
            rng.choice(KEYS) if rng.random() < 0.9 else rng.choice(["run.nmae", "model.width", "bogus.key"])
        )
        section, key = dotted.rsplit(".", 1)
        node = tree
        for part in section.split("."):
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        wild = rng.random() < 0.3 or dotted not in DEFAULTS
        node[key] = random_scalar(rng) if wild else plausible(rng, DEFAULTS[dotted])
    if rng.random() < 0.05:
        tree[rng.choice(list(tree))] = random_scalar(rng)  # a section that is not a mapping
    return tree


def random_file(rng: random.Random, path, base: dict) -> None:
    roll = rng.random()
    if roll < 0.05:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(40)))  # mostly not UTF-8
    elif roll < 0.10:
        path.write_text(rng.choice(["run: [", "a: b: c", "\t- x", "{{", "run:\n  name: *alias", "[" * 5000]))
    else:
        path.write_text(yaml.safe_dump(random_tree(rng, base), allow_unicode=True))


def random_overrides(rng: random.Random) -> list[str]:
    out = []
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        value = rng.choice(
            ODD_FLOATS
            + ["[" * 3000 + "]" * 3000, "'[1, [2]]'", "{a: 1}", "!!python/object:os.system", "x=y", ""]
        )
        out.append(f"{rng.choice(KEYS + ['nokey', 'a..b', '.x'])}={value}")
    return out


@pytest.mark.parametrize("chunk", range(10))
def test_random_configs_give_a_config_or_one_line(chunk, tmp_path, capsys):
    base = read_yaml(TINY_CONFIG)
    base.get("data", {}).pop(
        "paths", None
    )  # the default corpus exists everywhere; random paths mostly do not
    for index in range(chunk * DOCUMENTS // 10, (chunk + 1) * DOCUMENTS // 10):
        rng = random.Random(index)
        path = tmp_path / f"fuzz-{index}.yaml"
        random_file(rng, path, base)
        overrides = random_overrides(rng)
        code = main(["config", str(path), *overrides])
        out, err = capsys.readouterr()
        assert code in (0, 2), (index, code, err[-500:])
        if code == 2:
            assert err.startswith("raylm: error: ") and err.count("\n") == 1 and not out, (index, err[-500:])
        else:
            printed = yaml.safe_load(out)
            assert to_dict(resolve(printed)) == printed, index
            assert all(math.isfinite(v) for v in leaves(printed) if isinstance(v, float)), (index, printed)


def leaves(node):
    if isinstance(node, dict):
        for child in node.values():
            yield from leaves(child)
    elif isinstance(node, list):
        for child in node:
            yield from leaves(child)
    else:
        yield node
