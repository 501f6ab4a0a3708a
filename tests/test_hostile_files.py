"""Hostile adapter files and upload archives: each one gets its typed error, fast, with a bounded message.

Unit level (``load_adapter`` and ``extract_archive`` directly, no server): the catalogue lives in
``tests/hostile_cases.py`` so end-to-end suites can upload the same cases. Run with ``-s`` to see
the catalogue's size and how many cases got their exact error.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import pytest
import torch
from deft_server.errors import UploadTooLarge
from deft_server.uploads import extract_archive, validate_name
from hostile_cases import ADAPTER_CASES, ARCHIVE_CASES, ARCHIVE_LIMIT, confused_case, json_text, write_peft
from safetensors.torch import save_file

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.compile import compile_adapter
from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterTooLarge,
    InvalidAdapter,
    NonFiniteAdapter,
    shorten,
)
from deft_runtime.formats import ReadLimits, load_adapter
from deft_runtime.formats.patterns import PatternTable
from deft_runtime.testing import random_adapter

#: an echoed value is cut near 80 characters; a whole message stays far below gRPC's 16 KiB headers
MAX_MESSAGE_CHARS = 1000
#: CPU seconds any single hostile input may cost (the attacks below cost minutes before the fix)
CPU_BUDGET_S = 1.0


def _cpu_seconds(fn) -> tuple[float, BaseException | None]:
    start = time.process_time()
    try:
        fn()
    except BaseException as e:
        return time.process_time() - start, e
    return time.process_time() - start, None


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: c.id)
def test_hostile_adapter_file_gets_its_typed_error(tmp_path, case):
    path = case.build(tmp_path)
    cpu, error = _cpu_seconds(lambda: load_adapter(path))
    assert isinstance(error, case.error), f"{case.id}: expected {case.error.__name__}, got {error!r}"
    assert isinstance(error, InvalidAdapter), "every malformed file maps to INVALID_ARGUMENT"
    assert re.search(case.match, str(error)), f"{case.id}: {str(error)[:300]!r} does not match {case.match!r}"
    assert len(str(error)) < MAX_MESSAGE_CHARS
    assert cpu < CPU_BUDGET_S, f"{case.id} cost {cpu:.2f} s of CPU"


@pytest.mark.parametrize("case", ARCHIVE_CASES, ids=lambda c: c.id)
def test_hostile_archive_is_refused_while_streaming(tmp_path, case):
    archive = tmp_path / "upload.tar"
    archive.write_bytes(case.build())
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    cpu, error = _cpu_seconds(lambda: extract_archive(archive, out, limit=ARCHIVE_LIMIT))
    assert isinstance(error, case.error), f"{case.id}: expected {case.error.__name__}, got {error!r}"
    assert re.search(case.match, str(error)), f"{case.id}: {str(error)[:300]!r} does not match {case.match!r}"
    assert len(str(error)) < MAX_MESSAGE_CHARS
    assert cpu < CPU_BUDGET_S, f"{case.id} cost {cpu:.2f} s of CPU"
    outside = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} - {"upload.tar", "deep"}
    assert not outside, f"{case.id} wrote {outside} outside the destination"
    assert not any(out.iterdir()), f"{case.id} left files behind in the destination"


@pytest.mark.parametrize("seed", range(120))
def test_type_confusion_in_configs_never_escapes_as_an_internal_error(tmp_path, seed):
    """Seeded swaps of config fields for values of other types: each file loads or is InvalidAdapter."""
    try:
        adapter = load_adapter(confused_case(seed)(tmp_path))
    except InvalidAdapter as e:
        assert len(str(e)) < MAX_MESSAGE_CHARS
    else:  # whatever loaded has finite, bounded scales and matrix tensors
        assert all(
            math.isfinite(layer.scale) and abs(layer.scale) <= 1e4 for layer in adapter.layers.values()
        )


def test_catalogue_size(capsys):
    kinds = {c.error.__name__ for c in ADAPTER_CASES} | {c.error.__name__ for c in ARCHIVE_CASES}
    with capsys.disabled():
        print(
            f"\nhostile catalogue: {len(ADAPTER_CASES)} adapter files, {len(ARCHIVE_CASES)} archives, errors {sorted(kinds)}"
        )
    assert len(ADAPTER_CASES) >= 60 and len(ARCHIVE_CASES) >= 15
    assert len({c.id for c in ADAPTER_CASES + ARCHIVE_CASES}) == len(ADAPTER_CASES) + len(ARCHIVE_CASES)


# ---------------------------------------------------------------- ReDoS


def _lora_dir(tmp_path: Path, modules: dict[str, int], config: dict) -> Path:
    tensors = {}
    for module, r in modules.items():
        tensors[f"{module}.lora_A.weight"] = torch.ones(r, 4)
        tensors[f"{module}.lora_B.weight"] = torch.ones(4, r)
    return write_peft(tmp_path, json_text({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}), tensors)


def test_exponential_regex_in_rank_pattern_resolves_in_milliseconds(tmp_path):
    """``(a|aa)*c`` backtracks exponentially in ``re`` (2^n on n ``a``); deft's matcher is linear."""
    no_c, with_c = "a" * 1000, "a" * 999 + "c"
    path = _lora_dir(
        tmp_path, {no_c: 2, with_c: 4}, {"rank_pattern": {"(a|aa)*c": 4}, "alpha_pattern": {"(a|aa)*c": 8}}
    )
    cpu, error = _cpu_seconds(lambda: load_adapter(path))
    assert error is None and cpu < 0.5, f"{cpu:.2f} s, {error!r}"
    adapter = load_adapter(path)
    assert adapter.layers[no_c].rank == 2 and adapter.layers[no_c].scale == 1.0  # default alpha 2 / r 2
    assert adapter.layers[with_c].rank == 4 and adapter.layers[with_c].scale == 2.0  # alpha 8 / r 4


def test_polynomial_regex_in_alpha_pattern_is_linear(tmp_path):
    """Adjacent quantifiers (``.*.*.*…x``) cost O(n^k) with backtracking, O(n·states) here."""
    module = "b." * 400 + "q"
    path = _lora_dir(tmp_path, {module: 2}, {"alpha_pattern": {".*" * 40 + "x": 100}})
    cpu, error = _cpu_seconds(lambda: load_adapter(path))
    assert error is None and cpu < 0.5, f"{cpu:.2f} s, {error!r}"


_RNG = random.Random(5)
#: 4096 plain keys of 4096 different (width, wildcard positions): no bucketing helps, the budget must
_SCATTERED_KEYS = ["".join(_RNG.choice("ab.") for _ in range(_RNG.randint(1, 250))) for _ in range(4096)]


@pytest.mark.parametrize(
    ("keys", "names"),
    [
        (_SCATTERED_KEYS, ["." * 300 + str(i) for i in range(1000)]),  # plain keys
        ([f"(a|b)*{i}x" for i in range(4096)], ["ab" * 500 + str(i) for i in range(1000)]),  # NFA keys
    ],
    ids=["4096-plain-keys", "4096-regex-keys"],
)
def test_the_largest_pattern_table_is_refused_within_its_work_budget(keys, names):
    """4096 keys x 1000 long names that match none: refused after about a second, not minutes."""
    table = PatternTable.parse(dict.fromkeys(keys, 4), "rank_pattern")
    cpu, error = _cpu_seconds(lambda: [table.lookup(n) for n in names])
    assert isinstance(error, AdapterFormatError) and "took more than" in str(error)
    assert cpu < 3.0, f"{cpu:.2f} s"


NAMES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj",
    "to_q",
    "xto_q",
    "a.b\n",
]
PATTERNS = [
    "to_q",
    "attn1.to_q",
    "to_out.0",
    "to_out\\.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks\\.[0-9]+\\..*to_q",
    "(to_q|to_k)",
    "to_[qk]",
    "^mid.*",
    ".*attn2.*",
    "up_blocks\\.\\d\\.attentions\\.[^1]\\..*proj",
    "t?o_(q){1,2}",
    "b$",
    "a.b",
    "\\w+_block\\..*to_k",
    "(?:ff|attn)\\.net.0\\.proj",
    "to_q|mid_block.*",
    "",
    "a*",
    "[^.]*to_q",
    "\\Ato_q\\Z",
]


def test_pattern_lookup_agrees_with_peft():
    """The oracle is PEFT's own ``get_pattern_key`` (``re.match(rf"(.*\\.)?({key})$", name)``)."""
    from peft.utils.other import get_pattern_key

    for pattern in PATTERNS:
        table = PatternTable.parse({pattern: 7}, "rank_pattern")
        for name in NAMES:
            expected = get_pattern_key([pattern], name) == pattern and re.match(rf"(.*\.)?({pattern})$", name)
            assert (table.lookup(name) == 7) == bool(expected), (pattern, name)
    table = PatternTable.parse({p: i for i, p in enumerate(PATTERNS)}, "alpha_pattern")
    for name in NAMES:
        key = get_pattern_key(PATTERNS, name)
        assert table.lookup(name) == (PATTERNS.index(key) if key in PATTERNS else None), name


def _random_regex(rng: random.Random, depth: int = 0) -> str:
    atoms = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", "[a-c.]", "x", "^", "$", r"\A", r"\Z"]
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice(atoms)
    if r < 0.55:
        return _random_regex(rng, depth + 1) + _random_regex(rng, depth + 1)
    if r < 0.7:
        return f"({_random_regex(rng, depth + 1)}|{_random_regex(rng, depth + 1)})"
    return f"(?:{_random_regex(rng, depth + 1)}){rng.choice(['*', '+', '?', '{2}', '{0,2}', '{1,}', '*?'])}"


def test_the_nfa_agrees_with_re_on_random_regexes():
    """Differential test: 300 random regexes (groups, alternation, nested quantifiers, anchors) over
    short names, where ``re``'s backtracking is still cheap, give ``re``'s answer."""
    rng = random.Random(0)
    names = ["".join(rng.choice("ab.x1\n") for _ in range(rng.randint(0, 9))) for _ in range(40)]
    for _ in range(300):
        pattern = _random_regex(rng)
        table = PatternTable.parse({pattern: 1}, "rank_pattern")
        for name in names:
            expected = re.match(rf"(.*\.)?({pattern})$", name) is not None
            assert (table.lookup(name) == 1) == expected, (pattern, name)


def test_the_plain_key_index_agrees_with_peft():
    """Tables of plain keys (literals, ``.`` wildcards, ``\\.``) resolve to PEFT's first matching key."""
    from peft.utils.other import get_pattern_key

    rng = random.Random(1)
    for _ in range(200):
        keys = list(
            dict.fromkeys(
                "".join(rng.choices(["a", "b", ".", "\\."], k=rng.randint(1, 4))) for _ in range(12)
            )
        )
        table = PatternTable.parse({k: i for i, k in enumerate(keys)}, "alpha_pattern")
        for _ in range(30):
            name = "".join(rng.choices("ab.\n", k=rng.randint(0, 7)))
            key = get_pattern_key(keys, name)
            matched = key in keys and re.match(rf"(.*\.)?({key})$", name) is not None
            assert table.lookup(name) == (keys.index(key) if matched else None), (keys, name)


def test_a_thousand_literal_patterns_over_a_thousand_modules_is_fast():
    """diffusers writes one rank_pattern entry per module whose rank differs: the common case is cheap."""
    names = [f"down_blocks.{i % 4}.attentions.{i}.transformer_blocks.0.attn1.to_q" for i in range(1000)]
    table = PatternTable.parse({n: 4 for n in names}, "rank_pattern")
    cpu, error = _cpu_seconds(lambda: [table.lookup(n) for n in names])
    assert error is None and cpu < 1.0, f"{cpu:.2f} s"
    assert table.lookup(names[-1]) == 4 and table.lookup("other.to_q") is None


# ---------------------------------------------------------------- scalars


@pytest.mark.parametrize(("alpha", "ok"), [(2e4, True), (2e4 + 2, False), (-2e4, True)])
def test_scale_bound_is_inclusive(tmp_path, alpha, ok):
    """|alpha / r| ≤ 1e4 registers; one step above is refused, naming the layer and the bound."""
    path = _lora_dir(tmp_path, {"proj": 2}, {"lora_alpha": alpha})
    if ok:
        assert load_adapter(path).layers["proj"].scale == alpha / 2
    else:
        with pytest.raises(
            AdapterFormatError, match=r"scale of layer 'proj' is 10001.0, outside \[-10000, 10000\]"
        ):
            load_adapter(path)


def test_compilation_that_overflows_float32_is_refused():
    adapter = random_adapter(AdapterKind.DEFT, {"proj": (8, 8)}, rank=2, decomposition=Decomposition.PLAIN)
    adapter.layers["proj"].P.fill_(3e38)  # finite, but P^T·W0 sums 8 of them: inf in float32
    with pytest.raises(NonFiniteAdapter, match=r"layer 'proj'.*overflow"):
        compile_adapter(adapter, {"proj": torch.ones(8, 8)})


def test_float8_tensors_in_memory_are_a_dtype_error():
    """Adapters built in code (the trainer, tests) pass the same dtype allowlist as files."""
    adapter = random_adapter(AdapterKind.LORA, {"proj": (8, 8)}, rank=2)
    layer = adapter.layers["proj"]
    adapter.layers["proj"] = type(layer)(up=layer.up.to(torch.float8_e4m3fn), down=layer.down)
    with pytest.raises(
        AdapterDtypeError,
        match=r"proj.up has dtype torch.float8_e4m3fn; adapter tensors must be floating point \(float32",
    ):
        compile_adapter(adapter, {"proj": torch.ones(8, 8)})


def test_kohya_alphas_are_checked_at_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{key}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{key}.alpha": torch.tensor(3.0),
    }
    save_file(tensors, str(tmp_path / "k.safetensors"))
    assert (
        load_adapter(tmp_path / "k.safetensors")
        .layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
        .scale
        == 1.5
    )


def test_an_oversized_adapter_config_is_refused_before_parsing(tmp_path):
    path = _lora_dir(tmp_path, {"proj": 2}, {"padding": "x" * 5000})
    with pytest.raises(AdapterTooLarge, match=r"adapter_config.json is \d+ bytes, above the limit of 4096"):
        load_adapter(path, limits=ReadLimits(max_header_bytes=4096))
    assert load_adapter(path).layers["proj"].rank == 2


# ---------------------------------------------------------------- echoed input


def test_shorten_bounds_what_is_echoed():
    assert shorten("abc") == "'abc'"
    long = shorten("x" * 10_000)
    assert long.startswith("'xxxx") and "10000 characters" in long and len(long) < 120
    assert shorten(1.5) == "1.5"
    assert len(shorten(list(range(10_000)))) < 120
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert "nested" in shorten(nested)


def test_long_adapter_names_are_refused_with_a_short_message():
    from deft_runtime.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        validate_name("n" * 10_000)
    assert len(str(info.value)) < 300 and "10000 characters" in str(info.value)


def test_archive_within_limits_still_unpacks(tmp_path):
    from hostile_cases import tar_bytes

    for i, data in enumerate(
        [tar_bytes([("dir/", b""), ("adapter_config.json", b"{}"), ("x", b"y" * 1000)])]
    ):
        archive = tmp_path / f"{i}.tar"
        archive.write_bytes(data)
        out = tmp_path / f"out{i}"
        out.mkdir()
        extract_archive(archive, out, limit=ARCHIVE_LIMIT)
        assert (out / "x").read_bytes() == b"y" * 1000 and json.loads(
            (out / "adapter_config.json").read_text()
        ) == {}
    with pytest.raises(UploadTooLarge):
        archive.write_bytes(tar_bytes([("a", b"1" * 600), ("b", b"2" * 600)]))
        extract_archive(archive, tmp_path / "out0", limit=1000)
