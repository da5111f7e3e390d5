"""``python -m dinocache.cli`` (and ``torchrun -m dinocache.cli train ...``): the `dinocache` command."""

from dinocache.cli import main

main()
