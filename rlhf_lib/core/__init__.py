"""The shared core every stage stands on: typed params (:mod:`.config`), files (:mod:`.io`), run folders and their
provenance (:mod:`.runs`), one writer per run (:mod:`.runlock`), process settings (:mod:`.runtime`), what every
command line shares -- interrupts, exit statuses, one ``error:`` line (:mod:`.cli`) -- figure helpers
(:mod:`.figures`) and confidence intervals (:mod:`.intervals`). It imports nothing above it.

Notebooks use two of its modules by name: ``config.from_namespace`` types a notebook's parameters and
``runs.start_stage`` / ``runs.finish_stage`` open and close a stage's run folder.
"""

__all__ = ["cli", "config", "figures", "intervals", "io", "runlock", "runs", "runtime"]
