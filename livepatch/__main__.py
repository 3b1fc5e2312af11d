"""`python -m livepatch ...` is the `livepatch` command."""
import sys

from livepatch.cli import main

sys.exit(main())
