"""The argument parser of every command: a mistake in a config or on the command line is one line."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from omnimae_pl.errors import EXIT_USER_ERROR

_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value",
          "- Problem with given class_path")


def condense_parse_error(message: str) -> str:
    """jsonargparse's nested report (union subtypes, the given value, the whole sub-config) -> one line: the full
    key, the class it belongs to, and the innermost reason."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"class_path '([^']+)'", message)
    lines = [re.sub(r'^(- )?Parser key "[^"]+":\s*', "", line.strip()) for line in message.splitlines()]
    reasons = [line.lstrip("- ") for line in lines if line and not line.startswith(_NOISE)]
    reason = reasons[0] if reasons else lines[0]
    if len(keys) > 1 and classes:
        keys = [keys[0], "init_args", *keys[1:]]
    where = ".".join(keys)
    where += f" ({classes[0]})" if classes else ""
    return f"{where}: {reason}" if where else reason


class OneLineErrorParser(LightningArgumentParser):
    """A mistake on the command line or in a config is one line on stderr (exit 2), never the usage text and a
    dump of the whole config."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"omnimae-cli: error: {condense_parse_error(message)}\n")
        sys.stderr.write(f"(accepted options: {self.prog.replace(' [options]', '')} --help)\n")
        sys.exit(EXIT_USER_ERROR)
