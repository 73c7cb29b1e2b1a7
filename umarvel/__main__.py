"""`python -m umarvel ...`, the form launchers such as `deepspeed --module umarvel` need."""
import sys

from umarvel.cli import main

sys.exit(main())
