"""The kernel command line: encoding, budgets, spilling, and that nothing can be injected."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from microvmc.compiler.cmdline import (
    COMMAND_LINE_MAX,
    INIT_ENV_BUDGET,
    GuestConfig,
    GuestMount,
    compose,
    decode,
    encode,
)

BASE = ("console=ttyS0", "reboot=t", "panic=-1", "quiet")
ROOT = GuestMount(fs="virtiofs", tag="root", mode="ro")
# What the kernel treats as a separator: C isspace() plus 0xA0, which its ctype marks as a space.
KERNEL_SPACE = re.compile(rb"[\t\n\v\f\r \xa0]")

text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=200)


def config(**changes) -> GuestConfig:
    base = dict(argv=("/bin/true",), env=(("PATH", "/bin"),), cwd="/", hostname="vm", root=ROOT)
    base.update(changes)
    return GuestConfig(**base)


def kernel_split(cmdline: str) -> list[bytes]:
    return [t for t in KERNEL_SPACE.split(cmdline.encode("utf-8")) if t]


@given(text)
def test_encode_round_trips_and_is_kernel_safe(value: str) -> None:
    encoded = encode(value)
    assert decode(encoded) == value
    assert re.fullmatch(r"[A-Za-z0-9\-_./,@+%]*", encoded)


def test_encode_examples() -> None:
    assert encode("hello world") == "hello%20world"
    assert encode('a"b=c:d') == "a%22b%3Dc%3Ad"
    assert encode("é") == "%C3%A9"
    assert encode("à") == "%C3%A0"  # 0xA0 is a space to the kernel: never raw
    assert encode("") == ""


@settings(max_examples=200)
@given(st.lists(text, min_size=1, max_size=8), st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True), text, max_size=8))
def test_values_never_add_kernel_parameters(argv: list[str], env: dict[str, str]) -> None:
    cfg = config(argv=tuple(argv), env=tuple(sorted(env.items())))
    line = compose(BASE, (), cfg)
    tokens = kernel_split(str(line))
    # One token per parameter: no value split into two, none invented.
    assert [t.decode() for t in tokens] == list(line.params)
    assert len(str(line)) <= COMMAND_LINE_MAX
    for token in tokens:
        name = token.split(b"=", 1)[0]
        assert b"." not in name and b'"' not in token
    if line.spill is None:
        params = dict(p.split("=", 1) for p in line.params if p.startswith("MVMC_"))
        assert [decode(params[f"MVMC_A{i}"]) for i in range(len(argv))] == argv
    else:
        assert line.params[-1] == "MVMC_SPILL=1"


def test_small_config_stays_on_the_command_line() -> None:
    line = compose(BASE, ("loglevel=7",), config(argv=("/bin/echo", "a b", ""), hostname="h"))
    assert str(line) == (
        "console=ttyS0 reboot=t panic=-1 quiet loglevel=7 MVMC_ROOT=virtiofs:root:ro MVMC_HOSTNAME=h "
        "MVMC_CWD=/ MVMC_A0=/bin/echo MVMC_A1=a%20b MVMC_A2= MVMC_E0=PATH=/bin"
    )
    assert line.spill is None


def test_forty_variables_spill_to_the_initramfs() -> None:
    env = tuple((f"VAR{i:02d}", f"value {i}") for i in range(40))
    line = compose(BASE, (), config(env=env))
    assert line.params == (*BASE, "MVMC_SPILL=1")
    spill = line.spill.decode().splitlines()
    assert spill[:3] == ["MVMC_ROOT=virtiofs:root:ro", "MVMC_HOSTNAME=vm", "MVMC_CWD=/"]
    assert spill[-1] == "MVMC_E39=VAR39=value%2039"
    assert len(spill) == 3 + 1 + 40


def test_env_entry_budget_is_the_kernels() -> None:
    # 3 fixed + 1 argv + N env entries: exactly the budget fits, one more spills.
    fits = config(env=tuple((f"V{i}", "x") for i in range(INIT_ENV_BUDGET - 4)))
    assert compose(BASE, (), fits).spill is None
    over = config(env=tuple((f"V{i}", "x") for i in range(INIT_ENV_BUDGET - 3)))
    assert compose(BASE, (), over).spill is not None


def test_byte_budget_spills_long_values() -> None:
    line = compose(BASE, (), config(env=(("BIG", "x" * 1024), ("BIG2", "y" * 1024))))
    assert line.spilled and len(str(line)) < 100


def test_extra_parameters_that_cannot_fit_are_an_error() -> None:
    import pytest

    from microvmc.compiler.cmdline import CmdlineError

    with pytest.raises(CmdlineError) as err:
        compose(BASE, tuple(f"opt{i}=" + "z" * 100 for i in range(25)), config())
    assert str(err.value) == ("takes 2664 bytes; the kernel's command line holds 2047, of which microvmc leaves 1023 "
                              "to the manifest")
    with pytest.raises(CmdlineError) as err:
        compose(BASE, tuple(f"w{i}" for i in range(24)), config())
    assert str(err.value) == "has 24 bare words, which reach init as arguments; at most 23 are left to the manifest"
    with pytest.raises(CmdlineError) as err:
        compose(BASE, tuple(f"v{i}=1" for i in range(27)), config())
    assert str(err.value) == ("has 27 name=value parameters, which reach init as environment entries; at most 26 "
                              "are left to the manifest")
    # Within those budgets, compose always finds room: microvmc's own parameters fit the rest.
    compose(BASE, tuple(f"o{i}=" + "z" * 20 for i in range(26)) + tuple(f"w{i}" for i in range(23)), config())


def test_microvmc_s_own_parameters_fit_what_is_kept_for_them() -> None:
    from conftest import fake_facts
    from microvmc.compiler.cmdline import COMMAND_LINE_MAX, EXTRA_BYTES_MAX
    from microvmc.compiler.graph import base_kernel_params

    from microvmc.kernel.cuts import PARAMETERS, SKIPPED_INITCALLS

    every_cut = {cut.when: "y" for cut in (*PARAMETERS, *SKIPPED_INITCALLS)}
    worst = base_kernel_params("tcg", fake_facts(tsc_khz=99_999_999), cpus=1, acpi=False, kernel_config=every_cut)
    assert len(" ".join((*worst, "MVMC_SPILL=1", "MVMC_DEBUG=1"))) + 1 <= COMMAND_LINE_MAX - EXTRA_BYTES_MAX


def test_user_limits_tty_and_hold_reach_init_as_parameters() -> None:
    from microvmc.compiler.cmdline import GuestUser, Rlimit, guest_params

    config = GuestConfig(argv=("id",), env=(), cwd="/", hostname="h", root=GuestMount(fs="9p", tag="root", mode="ro"),
                         user=GuestUser(uid=1000, gid=100, groups=(10, 20)),
                         rlimits=(Rlimit(name="NOFILE", soft=1024, hard=None),), tty=True, hold=True)
    params = dict(guest_params(config))
    assert params["MVMC_USER"] == "1000:100:10,20"
    assert params["MVMC_R0"] == "NOFILE:1024:inf"
    assert (params["MVMC_TTY"], params["MVMC_HOLD"]) == ("1", "1")
    no_groups = GuestConfig(argv=("id",), env=(), cwd="/", hostname="h", root=GuestMount(fs="9p", tag="root", mode="ro"),
                            user=GuestUser(uid=0, gid=0))
    assert dict(guest_params(no_groups))["MVMC_USER"] == "0:0:"
    assert "MVMC_TTY" not in dict(guest_params(no_groups)) and "MVMC_HOLD" not in dict(guest_params(no_groups))


def test_tcg_boot_cuts_noapictimer_only_for_one_cpu_without_acpi() -> None:
    from conftest import fake_facts
    from microvmc.compiler.graph import base_kernel_params

    facts = fake_facts(tsc_khz=2_000_000)
    assert base_kernel_params("tcg", facts, cpus=1, acpi=False)[-3:] == ("noreplace-smp", "no_timer_check", "noapictimer")
    assert "noapictimer" not in base_kernel_params("tcg", facts, cpus=2, acpi=False)
    assert "noapictimer" not in base_kernel_params("tcg", facts, cpus=1, acpi=True)  # the Debian kernel hangs
    assert "no_timer_check" in base_kernel_params("tcg", facts, cpus=1, acpi=True)
    assert not {"noreplace-smp", "no_timer_check", "noapictimer"} & set(base_kernel_params("kvm", facts, cpus=1, acpi=False))


def test_boot_cuts_follow_what_the_kernel_s_config_says_it_does() -> None:
    """The Debian kernel's hardening defaults, page-table check and initcalls are cut under TCG; the
    own kernel (its fragment has none of them), a kernel with no readable config and KVM get none."""
    from conftest import fake_facts
    from microvmc.compiler.graph import base_kernel_params
    from microvmc.kernel.requirements import fragment, parse_config

    facts = fake_facts(tsc_khz=2_000_000)
    debian = {"INIT_ON_ALLOC_DEFAULT_ON": "y", "DEBUG_WX": "y", "DYNAMIC_FTRACE": "y", "CRYPTO_KDF800108_CTR": "y",
              "ACPI": "y", "PCI": "y"}
    cuts = ("init_on_alloc=0", "rodata=off", "initcall_blacklist=ftrace_check_for_weak_functions,crypto_kdf108_init")
    assert base_kernel_params("tcg", facts, cpus=1, acpi=True, kernel_config=debian)[-3:] == cuts
    assert base_kernel_params("tcg", facts, cpus=1, acpi=True, kernel_config={**debian, "CRYPTO_KDF800108_CTR": "m",
                                                                                "DEBUG_WX": "n"})[-2:] == (
        "init_on_alloc=0", "initcall_blacklist=ftrace_check_for_weak_functions")
    plain = base_kernel_params("tcg", facts, cpus=1, acpi=True)
    for config in (None, parse_config(fragment()), {}):
        assert base_kernel_params("tcg", facts, cpus=1, acpi=False, kernel_config=config) == \
            base_kernel_params("tcg", facts, cpus=1, acpi=False)
    assert base_kernel_params("tcg", facts, cpus=1, acpi=True, kernel_config={}) == plain
    assert not set(cuts) & set(base_kernel_params("kvm", facts, cpus=1, acpi=True, kernel_config=debian))
