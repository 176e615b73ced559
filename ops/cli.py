"""The `heygem-ops` console script (and `python -m ops.cli`).

`heygem-ops zombies` replaces `ps aux | grep defunct | wc -l`, which operators run in `watch`
loops, and it must cost less than that pipeline. Importing click alone costs twice as much, so a
well-formed `zombies [--json] [--pid N]` goes straight to the report; anything else (other
commands, global options, --help, a bad value) goes through click, with its help and messages.
"""

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    zombies = _zombies_args(args)
    if zombies is not None:
        from ops.zombie_report import report

        sys.exit(report(*zombies))
    from ops.commands import cli

    cli(args=args, prog_name="heygem-ops")


def _zombies_args(args: list[str]) -> tuple[bool, int | None] | None:
    """(as_json, root pid) for exactly `zombies [--json] [--pid N]`, N > 0; None for anything else."""
    if args[:1] != ["zombies"]:
        return None
    given: dict[str, object] = {}
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--json":
            name, value = "json", True
        elif arg == "--pid":
            name, value = "pid", next(rest, "")
        elif arg.startswith("--pid="):
            name, value = "pid", arg.partition("=")[2]
        else:
            return None
        if name in given:
            return None
        given[name] = value
    pid = given.get("pid")
    if pid is not None and not (pid.isdecimal() and int(pid) > 0):
        return None
    return "json" in given, None if pid is None else int(pid)


if __name__ == "__main__":
    main()
