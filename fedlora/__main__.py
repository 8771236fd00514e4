"""``python -m fedlora`` runs the ``fedlora`` command."""

from fedlora.cli.main import cli

if __name__ == "__main__":
    cli()
