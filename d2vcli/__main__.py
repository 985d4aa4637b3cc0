"""`python -m d2vcli` is the same as the `d2v` command."""

from d2vcli.cli import main

main()
