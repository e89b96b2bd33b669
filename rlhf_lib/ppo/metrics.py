"""Training metrics: accumulate -> average -> write JSONL (+ optional TensorBoard / W&B), and the glossary.

``METRIC_GLOSSARY`` maps every metric name the PPO stage logs to a one-line meaning with what healthy values look
like; the README's glossary is generated from it and a test checks that every logged name is in it. Names follow
TRL's former PPOTrainer where one exists, so knowledge carries across (TRL docs, "Logging" / "PPO Trainer").
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from rlhf_lib.core import io

METRIC_GLOSSARY: dict[str, str] = {
    # bookkeeping
    "update": "PPO update (rollout + optimisation round) this row describes, counted from 1.",
    "episode": "Prompts answered so far (all processes): update x batch_size; the x axis TRL uses.",
    "lr": "Learning rate of this update (linear or cosine decay to 0 over the run).",
    # objective: what the rollout earned
    "objective/scores": "Mean score entering the reward (RM score, normalised if enabled, minus the missing-EOS "
    "penalty). The number PPO maximises: it should rise; a sudden jump with rising KL can be reward hacking.",
    "objective/kl": "Mean over sequences of the summed per-token KL(policy || reference) (k1 or k3). Starts at 0; "
    "should grow slowly and stay bounded (a few nats); negative k1 values or runaway growth mean trouble.",
    "objective/kl_coef": "Current KL coefficient beta (constant, or moved by the adaptive controller towards "
    "kl_target).",
    "objective/entropy": "Mean over sequences of the summed -log pi of the sampled tokens (TRL's estimate of the "
    "sequence entropy). Falls slowly as the policy sharpens; a collapse towards 0 means mode collapse.",
    "objective/non_score_reward": "Mean over sequences of the summed KL penalty -beta*KL. Near 0 at the start, "
    "becomes more negative as the policy moves away from the reference.",
    "objective/rlhf_reward": "objective/scores + objective/non_score_reward: the full KL-regularised reward. "
    "Should rise; if scores rise but this falls, the KL cost outweighs the gain.",
    "objective/response_length": "Mean number of response tokens up to and including the first EOS.",
    "policy/approxkl_avg": "Mean 0.5*(log ratio)^2 between the updated and rollout policy over PPO steps. Small "
    "(< ~0.05); large values mean steps that are too big (lower learning_rate).",
    "policy/clipfrac_avg": "Fraction of tokens where the policy ratio was clipped. Healthy about 0-0.2; near 0.5 "
    "means the learning rate or number of epochs is too high.",
    "policy/entropy_avg": "Mean per-token entropy of the policy's (temperature-scaled) distribution during the "
    "PPO epochs. Should decline slowly; a sharp drop signals collapse.",
    "loss/policy_avg": "Mean clipped surrogate loss. Hovers around 0 (advantages are whitened); its trend matters "
    "less than clipfrac and approxkl.",
    "loss/value_avg": "Mean clipped value loss (before vf_coef). Should fall as the value model learns the returns, "
    "then stay low; spikes follow jumps in the score distribution.",
    "val/clipfrac_avg": "Fraction of tokens where the value prediction was clipped. High (> ~0.5) early is normal "
    "for a value model starting from the RM; it should fall.",
    "val/ratio": "Mean probability ratio pi_new/pi_rollout over PPO steps. Should stay close to 1 (0.9-1.1).",
    "val/ratio_var": "Variance across PPO steps of the mean probability ratio. Near 0; growth means unstable updates.",
    "val/num_eos_tokens": "Number of responses (all processes) that ended with EOS in this update. Responses cut "
    "at response_length get the missing-EOS penalty when it is set.",
    # throughput and resources
    "episodes_per_s": "Episodes per second of this update's wall time (rollout + optimisation).",
    "tokens_per_s": "Generated tokens (batch x decoded steps) per second of generation time.",
    "time/generation": "Seconds spent sampling responses this update.",
    "time/forward": "Seconds of the rollout forwards: reference log-probs, reward scores, and the policy/value "
    "forwards whose outputs serve both the rewards and the first PPO step.",
    "time/optimization": "Seconds of the PPO epochs (forward + backward + optimiser steps).",
    "time/update": "Wall seconds of the whole update.",
    "memory/peak_rss_gib": "Peak resident memory of this process so far (GiB).",
}


class MetricAccumulator:
    """Running means of named scalars (each `add` is one observation)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self._sq: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: Any) -> None:
        """Record one observation of `name` (a float or a 0-d tensor)."""
        value = float(value.item() if hasattr(value, "item") else value)
        self._sum[name] += value
        self._sq[name] += value * value
        self._count[name] += 1

    def mean(self, name: str) -> float:
        return self._sum[name] / self._count[name] if self._count[name] else float("nan")

    def var(self, name: str) -> float:
        """Population variance of the observations of `name`."""
        n = self._count[name]
        if not n:
            return float("nan")
        mean = self._sum[name] / n
        return max(self._sq[name] / n - mean * mean, 0.0)

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in self._sum}


def _json_value(value: Any) -> Any:
    """JSON-safe scalar: floats stay floats, nan/inf become strings JSON can carry."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JSONLWriter:
    """Append rows to a JSONL log, one flushed line per row; `truncate_after` trims rows beyond an update."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: Mapping[str, Any]) -> None:
        self.write_many([row])

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        io.append_jsonl(self.path, [{k: _json_value(v) for k, v in row.items()} for row in rows])

    def truncate_after(self, update: int) -> None:
        """Keep only rows with ``row["update"] <= update`` (used when resuming from a checkpoint)."""
        if self.path.exists():
            io.write_jsonl(self.path, [row for row in read_jsonl(self.path) if row.get("update", 0) <= update])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics/samples log: a missing file gives no rows, a last line torn by a kill is ignored, any
    other bad line raises naming the file and line (:func:`rlhf_lib.core.io.read_jsonl`)."""
    return io.read_jsonl(path, missing_ok=True, torn_tail_ok=True)


class Reporter:
    """Optional external loggers named in ``report_to`` ("tensorboard", "wandb"), imported lazily."""

    def __init__(self, report_to: list[str], log_dir: str | Path, run_name: str, config: Mapping[str, Any]) -> None:
        self._tb = None
        self._wandb = None
        for target in report_to:
            if target == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:  # tensorboard is an optional extra
                    raise ImportError(
                        "report_to includes 'tensorboard' but the tensorboard package is missing: "
                        "pip install -e '.[tensorboard]' (or remove it from report_to)"
                    ) from err
                self._tb = SummaryWriter(log_dir=str(log_dir))
            elif target == "wandb":
                try:
                    import wandb
                except ImportError as err:
                    raise ImportError(
                        "report_to includes 'wandb' but wandb is not installed: pip install wandb "
                        "(or remove it from report_to)"
                    ) from err
                self._wandb = wandb.init(name=run_name, config=dict(config), reinit=True)
            else:
                raise ValueError(f"report_to: unknown target {target!r}; use 'tensorboard' and/or 'wandb'")

    def log(self, row: Mapping[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def glossary_markdown(names: Iterable[str] | None = None) -> str:
    """The glossary as a Markdown table (README and docs/metrics.md); a ``|`` in a meaning is escaped for the table."""
    names = list(names) if names is not None else list(METRIC_GLOSSARY)
    lines = ["| metric | meaning (healthy values) |", "|---|---|"]
    cells = {n: METRIC_GLOSSARY[n].replace("|", "\\|") for n in names}  # an unescaped | would split the cell
    lines += [f"| `{n}` | {cells[n]} |" for n in names]
    return "\n".join(lines)
