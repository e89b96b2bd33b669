"""``python -m rlhf_lib.compare --params params/compare/<profile>.yaml --base-run <run>`` (what `make compare` runs)."""

import sys

from rlhf_lib.compare.runner import main

sys.exit(main())
