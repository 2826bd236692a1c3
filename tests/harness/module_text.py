"""module.nix read as text (no nixpkgs needed): the keys of the config files it generates
and the flags on the command lines it writes, with the subcommands that read them."""

from __future__ import annotations

import re

# Its bindings that become the program's config files and command lines, and the
# subcommands that read them.
CONFIG_FILES = {
    "upstreamSettings": ("collect", "deploy"),
    "collectorSettings": ("collect",),
    "actuatorSettings": ("deploy",),
}
COMMAND_LINES = {
    "credentialArgs": ("collect", "deploy"),
    "collectorCommand": ("collect",),
    "actuatorCommand": ("deploy",),
}

Token = tuple[str, str]  # ("string" | "name" | "op", text)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")
_OPERATORS = ("...", "==", "!=", "//", "->", "<=", ">=", "&&", "||", "++")


def string_end(text: str, i: int) -> int:
    """Where the Nix string starting at text[i] ("..." or ''...'') ends, past its quote."""
    indented = text.startswith("''", i)
    i += 2 if indented else 1
    while i < len(text):
        if text.startswith("$${", i):  # an escaped interpolation
            i += 3
        elif text.startswith("${", i):
            i = interpolation_end(text, i + 2)
        elif indented and text.startswith("''", i):
            if not text.startswith(("'''", "''$", "''\\"), i):
                return i + 2
            i += 4 if text.startswith("''\\", i) else 3
        elif not indented and text[i] == "\\":
            i += 2
        elif not indented and text[i] == '"':
            return i + 1
        else:
            i += 1
    raise ValueError("a string never ends")


def interpolation_end(text: str, i: int) -> int:
    """Where the `${ ... }` whose code starts at text[i] ends, past its brace."""
    depth = 0
    while i < len(text):
        if text[i] == '"' or text.startswith("''", i):
            i = string_end(text, i)
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return i + 1
            depth -= 1
        i += 1
    raise ValueError("an interpolation never ends")


def nix_tokens(text: str) -> list[Token]:
    """Nix source as tokens: a string is one (its text between the quotes), comments and
    white space are none; anything else is a name or an operator."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        elif text[i] == '"' or text.startswith("''", i):
            end = string_end(text, i)
            quote = 1 if text[i] == '"' else 2
            tokens.append(("string", text[i + quote : end - quote]))
            i = end
        elif name := _NAME.match(text, i):
            tokens.append(("name", name.group()))
            i = name.end()
        else:
            operator = next((op for op in _OPERATORS if text.startswith(op, i)), text[i])
            tokens.append(("op", operator))
            i += len(operator)
    return tokens


def binding(tokens: list[Token], name: str) -> list[Token]:
    """The expression of `name = ...;`, a binding of module.nix's `let`."""
    for at in range(len(tokens) - 1):
        if tokens[at] == ("name", name) and tokens[at + 1] == ("op", "="):
            depth = 0
            for end in range(at + 2, len(tokens)):
                kind, text = tokens[end]
                if kind == "op" and text in ("{", "[", "("):
                    depth += 1
                elif kind == "op" and text in ("}", "]", ")"):
                    depth -= 1
                elif kind == "op" and text == ";" and depth == 0:
                    return tokens[at + 2 : end]
    raise AssertionError(f"module.nix has no binding {name} = ...;")


def attribute_keys(expression: list[Token]) -> set[str]:
    """The keys of the attribute sets an expression merges (`{ a = 1; } // optionalAttrs c
    { b = 2; }`): what is bound right inside their braces, not in nested sets or calls."""
    keys: set[str] = set()
    open_: list[str] = []  # the brackets around the token
    previous: Token = ("op", ";")
    inheriting = False
    for token in [*expression, ("op", ";")]:
        kind, text = token
        top = open_ == ["{"]
        if top and inheriting:
            if token == ("op", ";"):
                inheriting = False
            elif kind == "name":
                keys.add(text)
        if kind == "op" and text in ("{", "[", "("):
            open_.append(text)
        elif kind == "op" and text in ("}", "]", ")"):
            open_.pop()
        elif top and previous in (("op", "{"), ("op", ";")) and kind in ("name", "string"):
            if text == "inherit" and kind == "name":
                inheriting = True
            else:
                keys.add(text)
        previous = token
    return keys


def command_line_flags(expression: list[Token]) -> set[str]:
    """The flags an expression puts on a command line: its strings that are flags."""
    return {
        text.split("=")[0]
        for kind, text in expression
        if kind == "string" and re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*(=.*)?", text)
    }


def module_config_keys(text: str) -> dict[str, set[str]]:
    tokens = nix_tokens(text)
    return {name: attribute_keys(binding(tokens, name)) for name in CONFIG_FILES}


def module_flags(text: str) -> dict[str, set[str]]:
    tokens = nix_tokens(text)
    return {name: command_line_flags(binding(tokens, name)) for name in COMMAND_LINES}


def actuator_service_config(text: str, unit: str) -> dict[str, str]:
    """What module.nix passes to `actuatorService { ... }` for `systemd.services.<unit>`:
    the serviceConfig that unit adds to the shared one (`Type = "exec";` -> Type: exec)."""
    tokens = nix_tokens(text)
    start = [("name", unit), ("op", "="), ("name", "actuatorService"), ("op", "{")]
    for at in range(len(tokens) - len(start)):
        if tokens[at : at + len(start)] == start:
            config: dict[str, str] = {}
            i = at + len(start)
            while tokens[i] != ("op", "}"):
                key, equals, value, end = tokens[i : i + 4]
                assert equals == ("op", "=") and end == ("op", ";"), tokens[i : i + 4]
                config[key[1]] = value[1]
                i += 4
            return config
    raise AssertionError(f"module.nix has no systemd.services.{unit} = actuatorService {{...}}")
