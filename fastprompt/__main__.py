"""`python -m fastprompt bench|info`."""
import sys

from .cli import main

sys.exit(main())
