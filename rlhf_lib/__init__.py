"""rlhf-lab's library: data, reward model, PPO and evaluation stages (see README "Repo map")."""

import os as _os

TEXT_PROGRESS_ENV = "RLHF_LAB_TEXT_PROGRESS"  # "1" (set by `make pipeline` for its kernels): text progress bars


def text_progress() -> bool:
    """True in a headless pipeline run, whose console should show progress as text rather than as widgets."""
    return _os.environ.get(TEXT_PROGRESS_ENV) == "1"


if text_progress():
    # `make pipeline` runs the notebooks headless: text progress bars stream live to its console and stay readable
    # in the executed notebook, where a widget bar would be a dead "HBox(...)" (papermill saves no widget state).
    # Set before transformers / our stages import `tqdm.auto`.
    import tqdm.auto as _tqdm_auto
    import tqdm.std as _tqdm_std

    _tqdm_auto.tqdm, _tqdm_auto.trange = _tqdm_std.tqdm, _tqdm_std.trange
