"""``python -m cap_lab.cli ...`` (what ``torchrun ... -m cap_lab.cli score ...`` runs): the ``cap-lab`` command."""
import sys

from cap_lab.cli import main

sys.exit(main())
