"""Stage 1, notebook ``01_data_prep``: preference pairs for the reward model and prompt-only sets for PPO and the
evaluation, from a preference dataset (:mod:`.formats`, :mod:`.records`) or the offline simulated annotator
(:mod:`.annotator`); :mod:`.build` runs the stage, :mod:`.plots` draws it."""

from rlhf_lib.data.build import DataConfig, DataReport, load_split, prepare_data, sample_pairs
from rlhf_lib.data.plots import plot_data_overview

__all__ = ["DataConfig", "DataReport", "load_split", "plot_data_overview", "prepare_data", "sample_pairs"]
