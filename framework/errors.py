"""User-facing errors: one line, naming the file, key or image that is wrong; exit status 2."""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (recipe, data, checkpoint, world size). Printed as one line."""

    def __init__(self, message: str):
        super().__init__(message.replace("\n", " "))


def run_cli(main, argv=None) -> int:
    """Runs `main(argv)`; a UserError becomes `error: …` on stderr and exit status 2."""
    import sys

    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0 if rc is None else int(rc)
