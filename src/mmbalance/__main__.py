"""``python -m mmbalance`` (and ``torchrun -m mmbalance``) runs the command-line tool."""
import sys

from .cli import main

sys.exit(main())
