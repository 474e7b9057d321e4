"""What the console scripts share: one readable line for a user's mistake, exit 0 on success, one boolean style."""

import argparse
import functools
import os
import sys

# Errors that name a bad input (a flag, a file, a folder, a class, a checkpoint) and what to do: printed as one line.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError)


def console_script(name):
    """Wrap `main(argv)` as a console script: exit 0 when it returns, 2 with `name: error: message` on a user error.
    `WEAKTR_TRACEBACK=1` shows the traceback instead."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                main(argv)
            except USER_ERRORS as error:
                if os.environ.get("WEAKTR_TRACEBACK"):
                    raise
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                print(f"{name}: error: {message}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{name}: interrupted", file=sys.stderr)
                return 130
            return 0

        return run

    return decorate


class BooleanFlag(argparse.Action):
    """`--name` / `--no_name` (also `--no-name`), and the older `--name true|false` spelling."""

    TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        name = option_strings[0].removeprefix("--")
        extra = [] if name.startswith("no_") else [f"--no_{name}", f"--no-{name}"]
        super().__init__(option_strings + extra, dest, nargs="?", default=default, help=help, metavar="true|false")

    def __call__(self, parser, namespace, value, option_string=None):
        negative = option_string.startswith(("--no_", "--no-")) and option_string not in self.option_strings[:1]
        if negative and value is not None:
            parser.error(f"{option_string} takes no value")
        if value is None:
            setattr(namespace, self.dest, not negative)
            return
        lowered = str(value).lower()
        if lowered not in self.TRUE + self.FALSE:
            parser.error(f"{option_string}: expected true or false, got {value!r}")
        setattr(namespace, self.dest, lowered in self.TRUE)

    def format_usage(self):
        return " | ".join(self.option_strings[:2])
