"""``python -m rlhf_lib.sweeps params/sweeps/<name>.yaml`` (what `make sweep` runs)."""

import sys

from rlhf_lib.sweeps.runner import main

sys.exit(main())
