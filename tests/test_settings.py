"""The one table of options (collector/config.py OPTIONS): the NixOS module hands the program
nothing the table lacks, every setting arrives alike from a flag and from the config file,
and each subcommand offers exactly its own options.

module.nix is read as text (CI has no nixpkgs): a small Nix tokenizer finds the keys of the
config files it generates and the flags it puts on command lines. With NIXPKGS_LIB set,
tests/test_nix_files.py evaluates the module for real and checks the generated files too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from harness.module_text import (
    COMMAND_LINES,
    CONFIG_FILES,
    attribute_keys,
    module_config_keys,
    module_flags,
    nix_tokens,
)

from collector.cli import build_parser, main
from collector.config import (
    COMMANDS,
    OPTIONS,
    HealthSettings,
    Option,
    Paths,
    RebootMode,
    Settings,
    SwitchMode,
    settings_from,
)
from collector.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "module.nix"
CONTRACT = REPO / "docs" / "CONTRACT.md"

SETTINGS = [option for option in OPTIONS if option.setting is not None]
IN_FILE = [option for option in OPTIONS if option.file_type is not None]
FLAGGED = [option for option in OPTIONS if option.flags]


def by_name(options: Sequence[Option]) -> list[object]:
    return [pytest.param(option, id=option.name) for option in options]


# module.nix and docs/ are not in the package's source (package.nix `src`), whose check phase
# leaves out the tests marked nix: so are the others that read Nix files.
outside_the_package = pytest.mark.nix


# ---- module.nix, read as text -----------------------------------------------------------


def module_mismatches(text: str, options: Sequence[Option] = OPTIONS) -> list[str]:
    """What module.nix hands a subcommand that the table does not give it."""
    problems = []
    for name, keys in module_config_keys(text).items():
        for key in sorted(keys):
            for command in CONFIG_FILES[name]:
                if not any(
                    o.name == key and o.file_type is not None and command in o.commands
                    for o in options
                ):
                    problems.append(f"{name}: {command} has no config-file key {key}")
    for name, flags in module_flags(text).items():
        for flag in sorted(flags):
            for command in COMMAND_LINES[name]:
                if not any(flag in o.flags and command in o.commands for o in options):
                    problems.append(f"{name}: {command} has no flag {flag}")
    return problems


def test_the_nix_tokenizer_keeps_strings_whole() -> None:
    tokens = nix_tokens("a = \"x ${f \"}\" # y} #z\"; # comment\n b = ''q ''${r} ${s}''; c")
    assert tokens == [
        ("name", "a"),
        ("op", "="),
        ("string", 'x ${f "}" # y} #z'),
        ("op", ";"),
        ("name", "b"),
        ("op", "="),
        ("string", "q ''${r} ${s}"),
        ("op", ";"),
        ("name", "c"),
    ]


def test_attribute_keys_are_those_of_the_merged_sets_only() -> None:
    expression = nix_tokens(
        'base // { a = f { no = 1; }; "b" = [ { no = 2; } ]; } // optionalAttrs (x != { }) '
        "{ c = g (y: { no = 3; }); inherit (z) d e; } // optionalAttrs cond { f.g = 1; }"
    )
    assert attribute_keys(expression) == {"a", "b", "c", "d", "e", "f"}


@outside_the_package
def test_module_nix_hands_the_program_only_options_of_the_table() -> None:
    assert module_mismatches(MODULE.read_text()) == []


@outside_the_package
def test_the_extraction_finds_what_module_nix_hands_the_program() -> None:
    """So the test above cannot pass by finding nothing."""
    keys = module_config_keys(MODULE.read_text())
    assert len(keys["upstreamSettings"]) >= 5 and {"url", "timeout"} <= keys["upstreamSettings"]
    assert {"track", "every"} <= keys["collectorSettings"]
    assert len(keys["actuatorSettings"]) >= 10
    assert {"switch_mode", "health_timeout", "fleet_lock_group"} <= keys["actuatorSettings"]
    flags = module_flags(MODULE.read_text())
    assert flags["credentialArgs"] == {"--bearer-token-file", "--netrc-file"}
    assert "--config" in flags["collectorCommand"] and "--config" in flags["actuatorCommand"]


@outside_the_package
def test_an_option_the_module_uses_missing_from_the_table_is_reported() -> None:
    text = MODULE.read_text()
    keys = {key for found in module_config_keys(text).values() for key in found}
    flags = {flag for found in module_flags(text).values() for flag in found}
    used = [o for o in OPTIONS if o.name in keys or flags & set(o.flags)]
    assert len(used) >= 20
    for option in used:
        problems = module_mismatches(text, [o for o in OPTIONS if o is not option])
        assert problems, option.name
        assert all(option.name in p or set(option.flags) & set(p.split()) for p in problems)


@outside_the_package
@pytest.mark.parametrize(
    ("pattern", "insert", "reported"),
    [
        # A key in the first set, in a set merged with optionalAttrs, of the wrong
        # subcommand, or one the file may not set; a flag no subcommand has.
        (
            r"upstreamSettings\s*=\s*{",
            " release_keys = [ ];",
            [
                "upstreamSettings: collect has no config-file key release_keys",
                "upstreamSettings: deploy has no config-file key release_keys",
            ],
        ),
        (
            r"collectorSettings\s*=",
            " optionalAttrs true { no_such_key = 1; } //",
            ["collectorSettings: collect has no config-file key no_such_key"],
        ),
        (
            r"collectorSettings\s*=",
            ' { switch_mode = "boot"; } //',
            ["collectorSettings: collect has no config-file key switch_mode"],
        ),
        (
            r"actuatorSettings\s*=",
            " { force = true; } //",
            ["actuatorSettings: deploy has no config-file key force"],
        ),
        (
            r"credentialArgs\s*=",
            ' [ "--release-key" "%d/key" ] ++',
            [
                "credentialArgs: collect has no flag --release-key",
                "credentialArgs: deploy has no flag --release-key",
            ],
        ),
        (
            r"actuatorCommand\s*=\s*lib\.concatStringsSep\s*\"\s*\"\s*\(",
            ' [ "--every" "60" ] ++',
            ["actuatorCommand: deploy has no flag --every"],
        ),
    ],
)
def test_what_module_nix_hands_over_beyond_the_table_is_reported(
    pattern: str, insert: str, reported: list[str]
) -> None:
    text = MODULE.read_text()
    changed, count = re.subn(pattern, lambda m: m.group() + insert, text, count=1)
    assert count == 1, f"module.nix no longer matches {pattern!r}: update this test"
    assert module_mismatches(changed) == reported


# ---- the table itself ---------------------------------------------------------------------


def test_names_and_flags_are_unique_and_well_formed() -> None:
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names)
    for command in COMMANDS:
        flags = [flag for o in OPTIONS if command in o.commands for flag in o.flags]
        assert len(set(flags)) == len(flags), command
        # One group's options together: argparse would show a title twice.
        groups = [o.group for o in OPTIONS if command in o.commands]
        runs = [g for i, g in enumerate(groups) if g is not None and groups[i - 1] != g]
        assert len(set(runs)) == len(runs), command
    for o in OPTIONS:
        assert re.fullmatch(r"[a-z][a-z_]*", o.name), o.name
        assert o.commands and set(o.commands) <= set(COMMANDS), o.name
        assert all(re.fullmatch(r"-[a-z]|--[a-z][a-z-]*", flag) for flag in o.flags), o.name
        if o.switch is not None:  # a switch takes no word
            assert o.file_type in (bool, None) and o.parse is None and o.metavar is None
        if o.repeat and o.flags:
            assert o.file_type in (list, None), o.name


def test_every_field_of_settings_is_filled_by_one_option() -> None:
    fields = [f"paths.{f.name}" for f in dataclasses.fields(Paths)]
    fields += [f"health.{f.name}" for f in dataclasses.fields(HealthSettings)]
    fields += [f.name for f in dataclasses.fields(Settings) if f.name not in ("paths", "health")]
    assert sorted(str(o.setting) for o in SETTINGS) == sorted(fields)


@pytest.mark.parametrize("command", COMMANDS)
def test_without_flags_and_file_the_settings_are_the_dataclasses_defaults(command: str) -> None:
    settings = settings_from(build_parser().parse_args([command]))
    assert settings == Settings(paths=Paths(root="/", state_dir="/var/lib/nixos-autodeploy"))


# ---- every setting, from a flag and from the config file ---------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """An option on the command line and in the config file, and what each gives."""

    words: tuple[str, ...]  # the flag and its words
    from_flag: object
    file: object = None  # a config file's value, another than the flag's; None: no key
    from_file: object = None


SAMPLES = {
    "root": Sample(("--root", "/srv/a"), "/srv/a", "/srv/b", "/srv/b"),
    "state_dir": Sample(("--state-dir", "/srv/state-a"), "/srv/state-a", "/srv/b", "/srv/b"),
    "runtime_dir": Sample(("--runtime-dir", "/run/a"), "/run/a", "/run/b", "/run/b"),
    "url": Sample(("--url", "http://a/x"), "http://a/x", "https://b/y", "https://b/y"),
    "timeout": Sample(("--timeout", "5"), 5.0, 7, 7.0),
    "netrc_file": Sample(("--netrc-file", "/a/netrc"), "/a/netrc", "/b/netrc", "/b/netrc"),
    "bearer_token_file": Sample(("--bearer-token-file", "/a/t"), "/a/t", "/b/t", "/b/t"),
    "headers": Sample(
        ("--header", "X-A: 1", "--header", "X-B:2"),
        (("X-A", "1"), ("X-B", "2")),
        ["X-C: 3"],
        (("X-C", "3"),),
    ),
    "ca_file": Sample(("--ca-file", "/a/ca.pem"), "/a/ca.pem", "/b/ca.pem", "/b/ca.pem"),
    "prometheus_path": Sample(("--prometheus-path", "/a.prom"), "/a.prom", "/b.prom", "/b.prom"),
    "trusted_keys": Sample(
        ("--trusted-key", "ci-1:AAAA", "--trusted-key", "ci-2:BBBB"),
        ("ci-1:AAAA", "ci-2:BBBB"),
        ["ci-3:CCCC"],
        ("ci-3:CCCC",),
    ),
    "trusted_keys_file": Sample(("--trusted-keys-file", "/a/k"), "/a/k", "/b/k", "/b/k"),
    "signatures_required": Sample(("--signatures-required", "2"), 2, 3, 3),
    "host_name": Sample(("--host-name", "web1"), "web1", "db1", "db1"),
    "track": Sample(("--track",), True, True, True),
    "every": Sample(("--every", "30"), 30.0, 45, 45.0),
    "boot_dir": Sample(("--boot-dir", "/efi"), "/efi", "/boot/efi", "/boot/efi"),
    "min_free_store": Sample(("--min-free-store", "512M"), 512 << 20, "2G", 2 << 30),
    "switch_mode": Sample(("-s", "boot"), SwitchMode.BOOT, "smart", SwitchMode.SMART),
    "reboot_mode": Sample(("-r", "k-exec"), RebootMode.KEXEC, "reboot", RebootMode.REBOOT),
    "reboot_windows": Sample(
        ("--reboot-window", "02:00-04:00"),
        ("02:00-04:00",),
        ["Sat,Sun 01:00-05:00"],
        ("Sat,Sun 01:00-05:00",),
    ),
    "min_free_boot": Sample(("--min-free-boot", "64M"), 64 << 20, 1024, 1024),
    "keep_generations": Sample(("--keep-generations", "3"), 3, 0, 0),
    "prune_foreign": Sample(("--prune-foreign",), True, True, True),
    "fleet_lock_url": Sample(
        ("--fleet-lock-url", "http://airlock:3333"),
        "http://airlock:3333",
        "https://airlock.example.org",
        "https://airlock.example.org",
    ),
    "fleet_lock_group": Sample(("--fleet-lock-group", "db"), "db", "eu-1.web", "eu-1.web"),
    "prometheus_url": Sample(
        ("--prometheus-url", "http://prom:9090"),
        "http://prom:9090",
        "https://thanos.example.org/q",
        "https://thanos.example.org/q",
    ),
    "prometheus_bearer_token_file": Sample(
        ("--prometheus-bearer-token-file", "/a/pt"), "/a/pt", "/b/pt", "/b/pt"
    ),
    "prometheus_netrc_file": Sample(("--prometheus-netrc-file", "/a/n"), "/a/n", "/b/n", "/b/n"),
    "prometheus_ca_file": Sample(("--prometheus-ca-file", "/a/c"), "/a/c", "/b/c", "/b/c"),
    "rollout_wariness": Sample(("--rollout-wariness", "0"), 0.0, 1, 1.0),
    "halt_query": Sample(("--halt-query", "up == 0"), "up == 0", "vector(1)", "vector(1)"),
    "force": Sample(("-f",), True),
    "dry_run": Sample(("--dry-run",), True),
    "max_snapshot_age": Sample(("--max-snapshot-age", "0"), 0.0, 900, 900.0),
    "health_commands": Sample(
        ("--health-check", "true", "--health-check", "curl -f x"),
        ("true", "curl -f x"),
        ["false"],
        ("false",),
    ),
    "health_urls": Sample(
        ("--health-url", "http://a/h"), ("http://a/h",), ["https://b/h"], ("https://b/h",)
    ),
    "health_units": Sample(("--health-unit", "a"), ("a",), ["b.service"], ("b.service",)),
    "health_ignore_units": Sample(("--health-ignore-unit", "x*"), ("x*",), ["y"], ("y",)),
    "health_timeout": Sample(("--health-timeout", "9"), 9.0, 30, 30.0),
    "health_checks": Sample(("--no-health-checks",), False, False, False),
}


def value(settings: Settings, option: Option) -> object:
    assert option.setting is not None
    return functools.reduce(getattr, option.setting.split("."), settings)


def write_config(tmp_path: Path, data: dict[str, object], form: str = "json") -> str:
    path = tmp_path / f"config.{form}"
    if form == "json":
        path.write_text(json.dumps(data))
    else:  # JSON's strings, numbers, booleans and lists are TOML's too
        path.write_text("".join(f"{key} = {json.dumps(v)}\n" for key, v in data.items()))
    return str(path)


def parsed_settings(argv: list[str]) -> Settings:
    """Settings as main makes them (the subcommand's parser alone), checked against the
    whole parser's."""
    alone = build_parser(argv[0]).parse_args(argv)
    assert alone == build_parser().parse_args(argv)
    return settings_from(alone)


def test_every_setting_has_a_sample_unlike_its_default() -> None:
    assert set(SAMPLES) == {o.name for o in SETTINGS}
    defaults = settings_from(build_parser().parse_args(["deploy"]))
    for option in SETTINGS:
        sample = SAMPLES[option.name]
        assert sample.words[0] in option.flags, option.name
        assert sample.from_flag != value(defaults, option), option.name
        assert (sample.file is None) == (option.file_type is None), option.name
        if sample.file is not None:
            assert sample.from_file != value(defaults, option), option.name


def taking(options: Sequence[Option]) -> list[object]:
    """(option, subcommand) for each subcommand that takes the option."""
    return [pytest.param(o, c, id=f"{o.name}-{c}") for o in options for c in o.commands]


@pytest.mark.parametrize(("option", "command"), taking(SETTINGS))
def test_a_flag_arrives_in_settings(option: Option, command: str) -> None:
    sample = SAMPLES[option.name]
    assert value(parsed_settings([command, *sample.words]), option) == sample.from_flag


@pytest.mark.parametrize("option", by_name([o for o in SETTINGS if len(o.flags) > 1]))
def test_every_spelling_of_a_flag_is_the_same(option: Option) -> None:
    sample = SAMPLES[option.name]
    for flag in option.flags:
        words = [flag if word == sample.words[0] else word for word in sample.words]
        assert value(parsed_settings([option.commands[0], *words]), option) == sample.from_flag


@pytest.mark.parametrize("form", ["json", "toml"])
@pytest.mark.parametrize(("option", "command"), taking([o for o in SETTINGS if o in IN_FILE]))
def test_a_config_file_key_arrives_in_settings(
    tmp_path: Path, option: Option, command: str, form: str
) -> None:
    sample = SAMPLES[option.name]
    config = write_config(tmp_path, {option.name: sample.file}, form)
    assert value(parsed_settings([command, "--config", config]), option) == sample.from_file


@pytest.mark.parametrize(("option", "command"), taking([o for o in SETTINGS if o in IN_FILE]))
def test_a_flag_wins_over_the_config_file(tmp_path: Path, option: Option, command: str) -> None:
    sample = SAMPLES[option.name]
    # A switch sets one value only: the file says the other one, its default.
    in_file = sample.file if option.switch is None else option.default
    config = write_config(tmp_path, {option.name: in_file})
    settings = parsed_settings([command, *sample.words, "--config", config])
    assert value(settings, option) == sample.from_flag


def test_options_of_the_command_itself_reach_its_arguments() -> None:
    parser = build_parser()
    log = parser.parse_args(["log", "-n", "3", "--json", "--debug", "--config", "c.toml"])
    assert (log.n, log.json, log.debug, log.config) == (3, True, True, "c.toml")
    assert (parser.parse_args(["log"]).n, parser.parse_args(["status"]).json) == (20, False)
    assert parser.parse_args(["diff", "current", "/nix/store/x"]).systems == [
        "current",
        "/nix/store/x",
    ]
    assert parser.parse_args(["collect", "http://a/x"]).url_argument == "http://a/x"
    assert parsed_settings(["deploy", "http://a/x"]).url == "http://a/x"
    publish = parser.parse_args(["publish", *(w for n in PUBLISH for w in COMMAND_WORDS[n])])
    assert (publish.key_files, publish.serial, publish.expires_in) == (
        ["/ci/key", "/ci/key2"],
        42,
        43200.0,
    )
    assert (publish.hosts, publish.output) == (["web1=/nix/store/x"], "release.json")
    assert (publish.rollout_duration, publish.rollout_start) == (7200.0, 1_800_000_000)
    assert parser.parse_args(["publish"]).expires_in == 7 * 86400
    assert parser.parse_args(["verify", "r.json"]).release_file == "r.json"


PUBLISH = (
    *("key_files", "serial", "expires_in", "rollout_duration", "rollout_start"),
    *("system", "hosts", "output"),
)


@pytest.mark.parametrize(
    "words",
    [
        ["--expires-in", "7x"],
        ["--expires-in", "0"],
        ["--serial", "-1"],
        ["--rollout-duration", "0"],
        ["--rollout-start", "1.5"],
    ],
)
def test_a_bad_publish_word_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["publish", *words])
    assert exit_.value.code == 2 and words[1] in capsys.readouterr().err


# ---- bad config files -----------------------------------------------------------------


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "key", [o.name for o in OPTIONS if o.file_type is None] + ["bogus", "health_check"]
)
def test_an_unknown_key_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    config = write_config(tmp_path, {key: True})
    message = f"config file {config}: unknown key {key!r}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from(build_parser().parse_args(["deploy", "--config", config]))
    argv = ["status", "--root", str(tmp_path), "--state-dir", str(tmp_path), "--config", config]
    assert one_error_line(argv, capsys) == f"error: {message}"


def wrong_values(option: Option) -> list[object]:
    """Values of another type than the key holds (a JSON boolean is no number)."""
    assert option.file_type is not None
    candidates: list[object] = [{"a": 1}, True, 7, 7.5, "text", ["text"]]
    if option.file_type is bool:
        return [v for v in candidates if not isinstance(v, bool)]
    return [v for v in candidates if isinstance(v, bool) or not isinstance(v, option.file_type)]


@pytest.mark.parametrize("option", by_name(IN_FILE))
def test_a_value_of_the_wrong_type_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option
) -> None:
    assert len(wrong_values(option)) >= 3
    for wrong in wrong_values(option):
        config = write_config(tmp_path, {option.name: wrong})
        message = f"config file {config}: {option.name} has the wrong type"
        with pytest.raises(ConfigError, match=re.escape(message)):
            settings_from(build_parser().parse_args(["deploy", "--config", config]))
        argv = ["status", "--root", str(tmp_path), "--state-dir", str(tmp_path)]
        assert one_error_line([*argv, "--config", config], capsys) == f"error: {message}"


# ---- what each subcommand offers -------------------------------------------------------

# The words of the flags that are no setting.
COMMAND_WORDS = {
    "config": ("--config", "/nonexistent/config.json"),
    "debug": ("--debug",),
    "quiet": ("--quiet",),
    "json": ("--json",),
    "n": ("-n", "3"),
    "selector": ("--selector", '{job="node"}'),
    "wait_serial": ("--wait-serial", "12"),
    "fraction": ("--fraction", "0.5"),
    "wait_timeout": ("--timeout", "90"),  # a word the fetch's --timeout takes too
    "interval": ("--interval", "5"),
    "key_files": ("--key-file", "/ci/key", "--key-file", "/ci/key2"),
    "serial": ("--serial", "42"),
    "serial_from": ("--serial-from", "/ci/serial"),
    "expires_in": ("--expires-in", "12h"),
    "rollout_duration": ("--rollout-duration", "2h"),
    "rollout_start": ("--rollout-start", "1800000000"),
    "system": ("--system", "/nix/store/x"),
    "hosts": ("--host", "web1=/nix/store/x"),
    "output": ("-o", "release.json"),
}


@pytest.mark.parametrize(
    ("option", "command"),
    [pytest.param(o, c, id=f"{o.name}-{c}") for o in FLAGGED for c in COMMANDS],
)
def test_a_flag_is_offered_only_by_the_subcommands_that_take_it(
    capsys: pytest.CaptureFixture[str], option: Option, command: str
) -> None:
    words = SAMPLES[option.name].words if option.name in SAMPLES else COMMAND_WORDS[option.name]
    # fleet's --timeout is its wait's own, another option than the fetch's --timeout.
    other = [
        o for o in OPTIONS if command in o.commands and o is not option and words[0] in o.flags
    ]
    for parser in (build_parser(), build_parser(command)):
        if command in option.commands:
            assert getattr(parser.parse_args([command, *words]), option.name) is not None
        elif other:
            assert not hasattr(parser.parse_args([command, *words]), option.name)
        else:
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([command, *words])
            assert exit_.value.code == 2
            assert f"unrecognized arguments: {words[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_one_subcommands_parser_is_the_same_alone(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    helps = []
    for parser in (build_parser(), build_parser(command)):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1] and "--config FILE" in helps[0]


def contract_section(title: str) -> str:
    text = CONTRACT.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end]


@outside_the_package
def test_the_contract_lists_each_subcommands_flags() -> None:
    block = contract_section("Command line").split("```")[1]
    texts: dict[str, str] = {}  # a subcommand's line, COMMON's, UPSTREAM's, PROMETHEUS's
    current = ""
    for line in block.splitlines():
        if start := re.match(r"nixos-autodeploy (\w+)|([A-Z]+) +=", line):
            current = start.group(1) or f"[{start.group(2)}]"
            line = line[start.end() :]
        if current:
            texts[current] = texts.get(current, "") + " " + line
    groups = ("[COMMON]", "[UPSTREAM]", "[PROMETHEUS]")
    assert set(texts) == {*COMMANDS, *groups}
    for command in COMMANDS:
        text = texts[command]
        for group in groups:
            text = text.replace(group, texts[group])
        documented = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", text))
        offered = {flag for o in OPTIONS if command in o.commands for flag in o.flags}
        assert documented == offered, command


@outside_the_package
def test_the_contract_lists_the_config_files_keys() -> None:
    section = contract_section("Config file")
    keys = section[section.index("Top-level keys") : section.index("Unknown keys")]
    documented = set(re.findall(r"`([a-z][a-z0-9_]*)`", keys)) - set(COMMANDS)
    assert documented == {o.name for o in IN_FILE}
