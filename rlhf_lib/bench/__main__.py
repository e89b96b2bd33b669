"""``python -m rlhf_lib.bench`` (what `make bench` runs; its measured subprocesses run ``--worker NAME``)."""

from rlhf_lib.bench.cli import main

main()
