"""Hardware profile files are data: nothing in them is executed, every built-in profile survives a
save-and-reload round trip, and every bad field is a ValueError naming file, field, value, range."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

import fa2lab
from fa2lab.hardware import HardwareProfile, get_profile, list_profiles, load_profile, save_profile
from fa2lab.hardware.loading import parse_quantity

PACKAGE = Path(fa2lab.__file__).resolve().parent


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


ESCAPES = [
    # The escape that reached os through eval's empty builtins: object's subclasses.
    "[c for c in ().__class__.__mro__[1].__subclasses__() if c.__name__ == 'Popen'][0]"
    "(['touch', '{marker}']) and 1 * G",
    "__import__('os').system('touch {marker}') or 1 * T",
    "(lambda: open('{marker}', 'w'))() or 2 * KiB",
    "1 * KiB; import os",
    "KiB ** 100",
    "2 * 3 * KiB",
    "(1) * KiB",
]


@pytest.mark.parametrize("payload", ESCAPES)
@pytest.mark.parametrize("field", ["mem_bw", "smem_per_block", "clock_hz"])
def test_a_profile_file_never_runs_code(tmp_path, payload, field):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"base: h100\n{field}: \"{payload.format(marker=marker)}\"\n")
    with pytest.raises(ValueError, match=rf"{path}.*{field}.*cannot read"):
        load_profile(path)
    assert not marker.exists()


def test_the_package_never_evaluates_text():
    """No eval / exec / compile / __import__ call anywhere in fa2lab (torch.compile and
    re.compile are attributes of modules, ast.literal_eval reads literals only)."""
    banned = {"eval", "exec", "compile", "__import__", "execfile"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                bad = (isinstance(f, ast.Name) and f.id in banned) or (
                    isinstance(f, ast.Attribute) and f.attr in banned
                    and isinstance(f.value, ast.Name) and f.value.id in ("builtins", "__builtins__"))
                if bad:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Name) and node.id in ("eval", "exec") and not isinstance(node.ctx, ast.Store):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} (reference)")
    assert not found, f"eval/exec/compile in the package: {found}"
    assert len(list(PACKAGE.rglob("*.py"))) > 50  # the scan saw the package


@pytest.mark.parametrize("text, value", [
    ("163 * KiB", 163 * 1024), ("163*KiB", 163 * 1024), ("163 KiB", 163 * 1024), ("2.039 * TB", 2.039e12),
    ("1.5 GB", 1.5e9), ("1e9", 1e9), ("  42 ", 42.0), ("3.9 T", 3.9e12), (".5 M", 5e5), ("1 TiB", 2.0**40),
])
def test_parse_quantity_reads_number_unit_forms(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["KiB", "1 * * KiB", "1 KiB KiB", "1 kib", "nan", "inf", "1 * KiB + 1",
                                  "0x10", "1_000", "", "T"])
def test_parse_quantity_refuses_everything_else(text):
    with pytest.raises(ValueError, match="cannot read"):
        parse_quantity(text)


@pytest.mark.parametrize("name", list_profiles())
def test_every_builtin_profile_survives_a_round_trip(tmp_path, name):
    p = get_profile(name)
    back = load_profile(save_profile(p, tmp_path / f"{name}.yaml"))
    assert back == p
    assert load_profile(write(tmp_path, p.to_yaml(), "again.yaml")) == p


def test_text_fields_are_never_parsed(tmp_path):
    for value in ("T", "G", "1 * KiB", "2 TB", "1e9"):
        path = write(tmp_path, f"base: a100\nname: '{value}'\narch: '{value}'\n"
                               f"sources: {{mem_bw: '{value}'}}\nmem_bw: 1 TB\n")
        p = load_profile(path)
        assert p.name == value and p.arch == value and p.sources["mem_bw"] == value


def test_sources_of_overridden_fields(tmp_path):
    p = load_profile(write(tmp_path, "base: a100\nmem_bw: 1.555 TB\nunits: 100\nsources: {units: 'counted'}\n"))
    assert p.sources["mem_bw"] == str(tmp_path / "p.yaml") and p.sources["units"] == "counted"
    assert p.sources["clock_hz"] == get_profile("a100").sources["clock_hz"]


@pytest.mark.parametrize("line, field, shown", [
    ("units: 0", "units", "0"), ("units: -4", "units", "-4"), ("units: 2.7", "units", "2.7"),
    ("units: true", "units", "True"), ("units: '0.5'", "units", "0.5"),
    ("smem_per_block: -1 * KiB", "smem_per_block", "-1024"), ("smem_per_block: 0", "smem_per_block", "0"),
    ("mem_bw: 0", "mem_bw", "0"), ("mem_bw: -1 TB", "mem_bw", "-1000000000000"), ("mem_bw: .nan", "mem_bw", "nan"),
    ("mem_bw: .inf", "mem_bw", "inf"), ("clock_hz: -.inf", "clock_hz", "-inf"), ("clock_hz: false", "clock_hz", "False"),
    ("exp_per_s: 0", "exp_per_s", "0"), ("step_overhead_s: -1e-6", "step_overhead_s", None),
    ("spill_factor: 0", "spill_factor", "0"), ("l1_bytes: 1.5", "l1_bytes", "1.5"),
    ("llc_bytes: [1, 2]", "llc_bytes", None), ("mem_bw: {a: 1}", "mem_bw", None),
    ("peak_flops: [1, 2]", "peak_flops", "mapping"), ("peak_flops: {float16: -1}", "peak_flops", "-1"),
    ("peak_flops: {float16: .nan}", "peak_flops", "nan"), ("peak_flops: {int8: 1 T}", "peak_flops", "int8"),
    ("peak_flops_simd: {float32: 'x'}", "peak_flops_simd", "'x'"),
    ("compute_capability: 'nine'", "compute_capability", "nine"),
    ("compute_capability: [9, 0, 1]", "compute_capability", None),
    ("compute_capability: [0, 5]", "compute_capability", None),
    ("compute_capability: [9.5, 0]", "compute_capability", None),
    ("compute_capability: true", "compute_capability", None),
    ("name: [a, b]", "name", None), ("kind: tpu", "kind", "tpu"), ("arch: 3", "arch", "3"),
    ("sources: [a, b]", "sources", None), ("sources: {mem_bw: 3}", "sources", None),
    ("sources: {nonsense: 'x'}", "sources", "nonsense"),
    ("kernel_configs: [1, 2]", "kernel_configs", None), ("kernel_configs: {fwd: {64: {BLOCK_M: .nan}}}", "kernel_configs", None),
])
def test_every_bad_field_names_file_field_value_and_range(tmp_path, line, field, shown):
    path = write(tmp_path, f"base: h100\n{line}\n")
    with pytest.raises(ValueError) as info:
        load_profile(path)
    msg = str(info.value)
    assert str(path) in msg and f"field {field}" in msg, msg
    if shown:
        assert pytest.importorskip("re").search(shown, msg), msg
    assert "expected" in msg or "cannot read" in msg or "must be" in msg, msg


@pytest.mark.parametrize("line, field, value", [
    ("compute_capability: '9.0'", "compute_capability", (9, 0)),
    ("compute_capability: 8.6", "compute_capability", (8, 6)),
    ("compute_capability: [12, 0]", "compute_capability", (12, 0)),
    ("compute_capability: '10.0'", "compute_capability", (10, 0)),
    ("units: 132.0", "units", 132), ("smem_per_block: 227 * KiB", "smem_per_block", 227 * 1024),
    ("clock_hz: 1.83e9", "clock_hz", 1.83e9), ("clock_hz: 2 G", "clock_hz", 2e9),
    ("exp_per_s: null", "exp_per_s", None), ("peak_flops: {float16: null}", "peak_flops", {"float16": None}),
])
def test_good_fields_are_read_exactly(tmp_path, line, field, value):
    p = load_profile(write(tmp_path, f"base: h100\n{line}\n"))
    got = getattr(p, field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, what", [
    (None, "cannot read"),
    ("base: h100\nunits: [1, 2\n", "not a valid YAML"),
    ("base: h100\nmem_bw: !!python/object/apply:os.getpid []\n", "not a valid YAML"),
    ("!!python/name:os.system\n", "not a valid YAML"),
    ("- base\n- h100\n", "expected a mapping"),
    ("base: v100\n", "unknown hardware profile"),
    ("base: [h100]\n", "base"),
    ("\xff\xfe", None),
])
def test_file_level_problems_are_value_errors_naming_the_file(tmp_path, text, what):
    path = tmp_path / "p.yaml"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")) as info:
        load_profile(path)
    if what:
        assert what in str(info.value)


def test_direct_construction_is_validated_too():
    base = get_profile("t4")
    for field, value in (("units", 0), ("mem_bw", math.nan), ("clock_hz", math.inf), ("units", True),
                         ("compute_capability", ("9", ".", "0")), ("l1_bytes", -1)):
        with pytest.raises(ValueError, match=rf"profile 't4': {field}: expected"):
            dataclasses.replace(base, **{field: value})
    assert isinstance(dataclasses.replace(base, units=41), HardwareProfile)


def test_cli_profile_reports_a_bad_file(tmp_path, capsys):
    from fa2lab import cli

    path = write(tmp_path, "base: h100\nmem_bw: \"__import__('os').getpid() and 1 * T\"\n")
    assert cli.main(["profile", "--yaml", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().out


@pytest.mark.parametrize("text", [None, "- a\n", "a: [1\n", "x: !!python/object/apply:os.getpid []\n"])
def test_benchmark_configs_are_read_safely_and_named_in_errors(tmp_path, text):
    from fa2lab import cli
    from fa2lab.bench.tiles import load_sweep

    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    for load in (lambda: cli._load_sweep(path, None), lambda: load_sweep(path)):
        with pytest.raises(SystemExit, match=str(path).replace(".", r"\.")):
            load()
