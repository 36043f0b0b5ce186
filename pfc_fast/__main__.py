"""``python -m pfc_fast`` is the ``pfc-fast`` command (also under ``torchrun ... -m pfc_fast train``)."""
import sys


def main() -> int:
    """The ``pfc-fast`` command; without the application's extra, its message and exit status 1."""
    try:
        from .app.cli import main as cli_main
    except ImportError as error:
        if "pfc_fast[app]" not in str(error):
            raise
        print(f"pfc-fast: {error}", file=sys.stderr)
        return 1
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
