"""The README and docs/*.md stay true: repo paths, `make` targets, params profiles, `-p` overrides, generated tables.

Checked in code (fenced blocks and `inline code`) and in link targets, where commands and paths live; prose is not
parsed. After a change of ``rlhf_lib.ppo.metrics.METRIC_GLOSSARY`` or of the committed default-beta sweep summary
(the README headline) regenerate the tables with ``python tests/test_readme.py --write``.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250
# The README's short metric table (a subset, in this order); docs/metrics.md holds the whole glossary.
KEY_METRICS = (
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "val/num_eos_tokens",
)
SWEEPS = ROOT / "docs" / "sweeps"
SELECTION_SWEEP = SWEEPS / "eos_beta"  # the sweep that chose the default profile's beta
FRONTIER = ROOT / "docs" / "frontier" / "summary.json"  # params/compare/frontier.yaml's frontier.json
ENSEMBLE_FRONTIER = ROOT / "docs" / "compare" / "ensemble" / "frontier.json"  # params/compare/ensemble.yaml's
PIPELINE_COSTS = ROOT / "docs" / "pipeline" / "run-seed1.json"  # scripts/pipeline_costs.py of a fresh make pipeline
COMPARE = ROOT / "docs" / "compare"  # summary.json: params/compare/default.yaml; default_beta/: PPO vs best-of-N
EXPERIMENTS = ROOT / "docs" / "experiments.md"


def metric_table(names: tuple[str, ...] | None) -> str:
    from rlhf_lib.ppo import metrics

    return metrics.glossary_markdown(names)


def default_value(dotted: str):
    """The value of one section.key in params/default.yaml (None where the profile leaves it at the default)."""
    section, key = dotted.split(".", 1)
    return yaml.safe_load((ROOT / "params" / "default.yaml").read_text()).get(section, {}).get(key)


def headline_sweep() -> Path:
    """The README headline's source: the one shipped sweep whose summary says ``headline: true``."""
    marked = [p.parent for p in sorted(SWEEPS.glob("*/summary.json")) if json.loads(p.read_text()).get("headline")]
    if len(marked) != 1:
        raise AssertionError(f"exactly one docs/sweeps/*/summary.json must say headline: true, found {marked}")
    return marked[0]


def headline_table() -> str:
    """The default profile's cell of the headline sweep, mean ± 95 % CI over seeds and the 95 % prediction interval
    of one new run; grid keys as in default.yaml."""
    from rlhf_lib.sweeps import stats as sweep_stats

    summary = sweep_stats.load_summary(headline_sweep())
    cell = {k: default_value(k) for k in summary["grid"] if k != summary["seed_key"]}
    return sweep_stats.headline_markdown(summary, cell)


def sweep_cells_table(name: str) -> str:
    from rlhf_lib.sweeps import stats as sweep_stats

    return sweep_stats.cells_markdown(sweep_stats.load_summary(SWEEPS / name))


def sweep_seeds_table(name: str) -> str:
    from rlhf_lib.sweeps import stats as sweep_stats

    return sweep_stats.seeds_markdown(sweep_stats.load_summary(SWEEPS / name))


def eos_penalty_table() -> str:
    """default_beta's beta = 0.1 cell against eos_penalty's, paired by seed (same data, reward model, beta, seeds)."""
    from rlhf_lib.sweeps import stats as sweep_stats

    labels = ("no penalty (`default_beta`, β = 0.1)", "`ppo.missing_eos_penalty` = 1.0")
    without, with_ = (sweep_stats.load_summary(SWEEPS / name) for name in ("default_beta", "eos_penalty"))
    return sweep_stats.paired_markdown(without, {"ppo.kl_coef": 0.1}, with_, {"ppo.missing_eos_penalty": 1.0}, labels)


def compare_summary(folder: Path) -> dict:
    import json

    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def compare_table(folder: Path) -> str:
    from rlhf_lib.compare import report

    return report.methods_markdown(compare_summary(folder))


def frontier_table() -> str:
    from rlhf_lib.compare import report

    return report.frontier_markdown(compare_summary(COMPARE))


def pipeline_costs_table() -> str:
    """PIPELINE_COSTS (scripts/pipeline_costs.py of a fresh whole-pipeline run) as one row per phase."""
    import json

    c = json.loads(PIPELINE_COSTS.read_text(encoding="utf-8"))
    rm, ppo, ev, st = c["reward_model"], c["ppo"], c["eval"], c["stages_s"]

    def s(x) -> str:
        return "–" if x is None else f"{x:,.0f}"

    curve = None if not ev.get("reference") else st["eval"] - ev["reference"] - ev["policy_sampling"]
    rows = [
        ("data", "whole stage", st.get("data")),
        ("reward model", f"frozen trunk once ({rm['cached_trunk_blocks']} blocks, {rm['n_train_pairs']} pairs)",
         rm["trunk_s"]),
        ("reward model", "epochs (top blocks, forward + backward)", rm["epochs_s"]),
        ("reward model", "held-out evaluation", rm["heldout_eval_s"]),
        ("reward model", "whole stage (loading and saving included)", st.get("reward_model")),
        ("PPO", f"generation ({ppo['updates']} updates)", ppo["generation_s"]),
        ("PPO", "no-grad forwards: log-probs, values, rewards", ppo["forward_s"]),
        ("PPO", "optimisation (forward + backward, epochs)", ppo["optimization_s"]),
        ("PPO", f"whole stage (its first update, which compiles: {s(ppo['first_update_update_s'])} s)", st.get("ppo")),
        ("evaluation", "reference: sampling and scoring" + (" (cached)" if ev.get("reference_cached") else ""),
         ev.get("reference")),
        ("evaluation", "trained policy: sampling and KL log-probs", ev.get("policy_sampling")),
        ("evaluation", "trained policy: reward model and gold", ev.get("policy_scoring")),
        ("evaluation", "over-optimisation curve (rest of the stage)", curve),
        ("evaluation", "whole stage", st.get("eval")),
        ("all", f"sum of stages; peak RSS {c['peak_rss_gib']} GiB", sum(st.values())),
    ]  # fmt: skip
    lines = ["| stage | phase | seconds |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {s(x)} |" for a, b, x in rows]
    return "\n".join(lines)


def fresh_runs_table() -> str:
    """The headline sweep, one row per seed of the whole pipeline, then the mean and where one new run falls."""
    from rlhf_lib.sweeps import stats as sweep_stats

    summary = sweep_stats.load_summary(headline_sweep())
    return sweep_stats.seeds_markdown(summary, sweep_stats.PIPELINE_COLUMNS, prediction=True)


def rm_center_table() -> str:
    """rm_center (center_rewards_coefficient 0.01) against pipeline_seeds (off) on the same seeds: accuracy vs gold
    and calibration per seed, then the paired difference."""
    from rlhf_lib.sweeps import stats as sweep_stats

    off, on = sweep_stats.load_summary(headline_sweep()), sweep_stats.load_summary(SWEEPS / "rm_center")
    lines = ["| | seed | off | `center_rewards_coefficient` 0.01 | difference |", "|---|---|---|---|---|"]
    for label, key in (("accuracy vs gold", "reward_model.eval_accuracy_vs_gold"), ("ECE", "reward_model.eval_ece")):
        a, b = sweep_stats.seed_values(off, {}, key), sweep_stats.seed_values(on, {}, key)
        for seed in sorted(set(a) & set(b)):
            lines.append(f"| {label} | {seed} | {a[seed]:.3f} | {b[seed]:.3f} | {b[seed] - a[seed]:+.3f} |")
        diff = sweep_stats.paired_difference(off, {}, on, {}, key)
        lines.append(f"| {label} | mean ± 95 % CI | | | {sweep_stats.format_ci(diff)} |")
    return "\n".join(lines)


def frontier_view_table(kind: str, path: Path = FRONTIER) -> str:
    """A comparison's frontier view (docs/frontier/summary.json unless `path`) as one of its tables: best (against
    best-of-16), fit (best-of-N), points or rewards (accuracy vs gold)."""
    from rlhf_lib.compare import frontier

    view = json.loads(path.read_text(encoding="utf-8"))
    return getattr(frontier, f"{kind}_markdown")(view)


GENERATED = {  # (file, marker) -> what the block between <!-- marker:start --> and <!-- marker:end --> holds
    (README, "key-metrics"): lambda: metric_table(KEY_METRICS),
    (README, "headline"): headline_table,
    (EXPERIMENTS, "sweep-cells"): lambda: sweep_cells_table("default_beta"),
    (EXPERIMENTS, "eos-penalty"): eos_penalty_table,
    (EXPERIMENTS, "eos-beta"): lambda: sweep_cells_table("eos_beta"),
    (EXPERIMENTS, "rm-seeds"): lambda: sweep_seeds_table("rm_seeds"),
    (EXPERIMENTS, "adaptive-kl"): lambda: sweep_cells_table("adaptive_kl"),
    (EXPERIMENTS, "compare-default-beta"): lambda: compare_table(COMPARE / "default_beta"),
    (EXPERIMENTS, "compare-methods"): lambda: compare_table(COMPARE),
    (README, "compare-frontier"): frontier_table,
    (ROOT / "docs" / "metrics.md", "metrics"): lambda: metric_table(None),
    (ROOT / "docs" / "performance.md", "pipeline-costs"): pipeline_costs_table,
    (EXPERIMENTS, "fresh-runs"): fresh_runs_table,
    (EXPERIMENTS, "frontier-best"): lambda: frontier_view_table("best"),
    (EXPERIMENTS, "rm-center"): rm_center_table,
    (EXPERIMENTS, "frontier-fit"): lambda: frontier_view_table("fit"),
    (EXPERIMENTS, "frontier-points"): lambda: frontier_view_table("points"),
    (EXPERIMENTS, "ensemble-rewards"): lambda: frontier_view_table("rewards", ENSEMBLE_FRONTIER),
    (EXPERIMENTS, "ensemble-best"): lambda: frontier_view_table("best", ENSEMBLE_FRONTIER),
    (EXPERIMENTS, "ensemble-fit"): lambda: frontier_view_table("fit", ENSEMBLE_FRONTIER),
    (EXPERIMENTS, "ensemble-points"): lambda: frontier_view_table("points", ENSEMBLE_FRONTIER),
}
# Paths and `make` targets that land with other branches. Mentioning them is allowed until they exist; then
# test_pending_items_have_not_landed fails and the entry must be removed here (empty this set once all are merged).
PENDING = {
    "docs/gpu/bench-seed-shape.json",  # written by scripts/device_check.sh on a GPU machine
}

SECTIONS = ("common", "data", "reward_model", "ppo", "eval")
PATH_RE = re.compile(
    r"(?<![\w./~-])((?:params|notebooks|rlhf_lib|scripts|tests|docs|\.ci)/[\w.*/-]*"
    r"|Makefile|pyproject\.toml|environment\.yml)"
)
MODULE_RE = re.compile(r"(?<![\w./-])rlhf_lib((?:\.[A-Za-z_]\w*)+)")
MAKE_RE = re.compile(r"\bmake ([a-z][\w-]*)")
OVERRIDE_RE = re.compile(r"-p ([a-z_]+)\.([a-z_][\w.]*)=(\S*?)[\"']?(?=\s|$)")
FIELD_SPAN_RE = re.compile(rf"^({'|'.join(SECTIONS)})\.([a-z_][\w.]*)(?:=(\S+)|: (.+))?$")


def code_text(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a Markdown text."""
    fences = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fences + re.findall(r"`([^`\n]+)`", rest)


def link_targets(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s#]+)", text) if not re.match(r"[a-z]+:", t)]


def mentioned_paths(text: str, folder: str = "") -> set[str]:
    """Repo paths in code (relative to the root) and link targets (relative to the document's folder)."""
    paths = {os.path.normpath(os.path.join(folder, t)) for t in link_targets(text)}
    for chunk in code_text(text):  # a path running into a <placeholder> (params/<yours>.yaml) is a pattern, not a path
        paths.update(m.group(1).rstrip(".,:;") for m in PATH_RE.finditer(chunk) if chunk[m.end() : m.end() + 1] != "<")
    return {p for p in paths if p and not p.endswith("/.")}


def path_exists(path: str) -> bool:
    if "*" in path:
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


def is_pending(item: str) -> bool:
    return item in PENDING or any(p.endswith("/") and item.startswith(p) for p in PENDING)


def config_class(section: str) -> type:
    from rlhf_lib.core import config

    return config.CommonConfig if section == "common" else config.stage_config_class(section)


def field_error(section: str, dotted: str, value: str | None) -> str | None:
    """Why ``section.dotted(=value)`` is not a real params field (None when it is)."""
    from rlhf_lib.core import config

    if section not in SECTIONS:
        return f"unknown section {section!r}"
    cls, keys = config_class(section), dotted.split(".")
    common = {f.name for f in dataclasses.fields(config.CommonConfig)}
    if section != "common" and keys[0] in common:
        return f"{keys[0]!r} belongs in the common section (common.{keys[0]})"
    for i, key in enumerate(keys):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if key not in hints:
            return f"{'.'.join(keys[: i + 1])!r} is not a field of {getattr(cls, '__name__', cls)}"
        cls = hints[key]
    if value is not None and len(keys) == 1 and "<" not in value:
        try:
            config.validate(config_class(section), {keys[0]: yaml.safe_load(value)}, f"{section}.{dotted}")
        except config.ConfigError as err:
            return str(err)
    return None


def generated_block(path: Path, marker: str) -> str:
    return f"<!-- {marker}:start -->\n{GENERATED[path, marker]()}\n<!-- {marker}:end -->"


@pytest.fixture(params=DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def doc(request) -> tuple[str, str]:
    return str(request.param.relative_to(ROOT)), request.param.read_text(encoding="utf-8")


def test_readme_fits_in_250_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (limit {MAX_README_LINES}): move detail to docs/"


def test_mentioned_repo_paths_exist(doc):
    name, text = doc
    missing = sorted(
        p for p in mentioned_paths(text, os.path.dirname(name)) if not path_exists(p) and not is_pending(p)
    )
    assert not missing, f"{name} mentions {missing}, which do not exist: fix the path or add the file"


def module_file(dotted: str) -> Path | None:
    """rlhf_lib's file for a dotted module name (a module or a package's __init__), or None."""
    base = ROOT / Path(*dotted.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def split_reference(dotted: str) -> tuple[str, list[str]]:
    """'rlhf_lib.ppo.trainer.PPOConfig.kl_coef' -> ('rlhf_lib.ppo.trainer', ['PPOConfig', 'kl_coef'])."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if module_file(".".join(parts[:n])):
            return ".".join(parts[:n]), parts[n:]
    return "", parts


def test_mentioned_modules_and_attributes_exist(doc):
    name, text = doc
    for chunk in code_text(text):
        for dotted in MODULE_RE.findall(chunk):
            module, attrs = split_reference("rlhf_lib" + dotted)
            assert module != "rlhf_lib" or not attrs, f"{name} mentions rlhf_lib{dotted}: no such module"
            if attrs:
                assert hasattr(importlib.import_module(module), attrs[0]), (
                    f"{name} mentions {module}.{attrs[0]}, which {module_file(module).relative_to(ROOT)} lacks"
                )


def test_split_reference_finds_the_longest_module():
    assert split_reference("rlhf_lib.ppo.trainer.PPOConfig.kl_coef") == (
        "rlhf_lib.ppo.trainer",
        ["PPOConfig", "kl_coef"],
    )
    assert split_reference("rlhf_lib.ppo.PPOConfig") == ("rlhf_lib.ppo", ["PPOConfig"])
    assert split_reference("rlhf_lib.nothing_here") == ("rlhf_lib", ["nothing_here"])


def test_make_targets_exist(doc):
    name, text = doc
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+)\s*:(?!=)", makefile, re.M))
    used = {t for chunk in code_text(text) for t in MAKE_RE.findall(chunk)}
    missing = sorted(t for t in used if t not in targets and not is_pending(f"make {t}"))
    assert not missing, f"{name} mentions `make {missing[0]}`, not a target in the Makefile" if missing else ""


def test_overrides_and_field_names_are_real_config_fields(doc):
    name, text = doc
    found: list[tuple[str, str, str | None]] = []
    for chunk in code_text(text):
        found += [(s, k.rstrip("."), v or None) for s, k, v in OVERRIDE_RE.findall(chunk)]
        span = FIELD_SPAN_RE.match(chunk.strip())
        if span:
            found.append((span.group(1), span.group(2).rstrip("."), span.group(3) or span.group(4)))
    errors = [f"{s}.{k}: {err}" for s, k, v in found if (err := field_error(s, k, v))]
    assert not errors, f"{name}: {errors[0]} (see the config dataclasses in rlhf_lib/)"


def test_the_field_check_rejects_what_it_should():
    assert field_error("ppo", "kl_coef", "0.05") is None and field_error("common", "seed", None) is None
    assert "not a field" in field_error("ppo", "kl_coeff", None)
    assert "belongs in the common section" in field_error("ppo", "seed", "1")
    assert "must be" in field_error("ppo", "resume", "maybe")
    assert "unknown section" in field_error("policy", "kl_coef", None)


def test_markdown_tables_are_well_formed(doc):
    name, text = doc
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for block in re.findall(r"(?:^\|.*\n?)+", text, re.M):
        rows = block.strip("\n").split("\n")
        widths = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
        assert len(rows) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].strip()), (
            f"{name}: table starting {rows[0][:60]!r} lacks a |---| delimiter row"
        )
        bad = [row[:60] for row, w in zip(rows, widths) if w != widths[0]]
        assert not bad, f"{name}: table rows with a different number of cells than the header (escape | as \\|): {bad}"


def test_repo_map_names_every_package_and_script():
    readme = README.read_text(encoding="utf-8")
    packages = sorted(str(p.parent.relative_to(ROOT)) + "/" for p in (ROOT / "rlhf_lib").glob("*/__init__.py"))
    files = sorted(glob.glob(str(ROOT / "rlhf_lib" / "*.py")) + glob.glob(str(ROOT / "scripts" / "*.py")))
    names = packages + [str(Path(f).relative_to(ROOT)) for f in files if not f.endswith("__init__.py")]
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"README.md repo map lacks {missing}: add one line each"


def test_each_package_docstring_names_its_modules():
    """A package's __init__ docstring is its map: every module of the package is named there as :mod:`.name`."""
    for init in sorted((ROOT / "rlhf_lib").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        modules = sorted(p.stem for p in init.parent.glob("*.py") if not p.stem.startswith("__"))
        missing = [m for m in modules if f":mod:`.{m}`" not in doc]
        assert not missing, f"{init.relative_to(ROOT)}'s docstring does not name {missing} (as :mod:`.name`)"


@pytest.mark.parametrize("path, marker", list(GENERATED), ids=lambda x: x if isinstance(x, str) else x.name)
def test_generated_tables_are_current(path, marker):
    assert generated_block(path, marker) in path.read_text(encoding="utf-8"), (
        f"{path.relative_to(ROOT)}: the {marker} table is stale; regenerate with `python tests/test_readme.py --write`"
    )


def load_make_docs():
    """scripts/make_docs.py as a module: its doc_figures() lists every figure `make docs` draws."""
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "scripts" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_docs"] = module  # registered before it runs, as an import would (its dataclass looks it up)
    spec.loader.exec_module(module)
    return module


DOC_FIGURES = load_make_docs().doc_figures()
# Figures the docs show whose data is not committed yet: make docs leaves them as they are. Once the data lands,
# test_figures_waiting_for_data_still_lack_it fails and the entry must be removed here.
WAITING_FOR_DATA: set[str] = set()  # figures whose data is not committed yet (none now)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("entry", DOC_FIGURES, ids=[relative(e.figure) for e in DOC_FIGURES])
def test_doc_figures_are_current(entry):
    """Each figure make docs draws carries the digest of the data it was drawn from: it must match what the committed
    data gives now, or the figure shows numbers the data (and the tables) no longer hold."""
    from rlhf_lib.core.figures import read_stamp

    name = relative(entry.figure)
    if not entry.source.exists():
        assert name in WAITING_FOR_DATA, f"{name}: its data {relative(entry.source)} is not committed"
        pytest.skip(f"{relative(entry.source)} is not committed yet: make docs leaves {name} as it is")
    assert entry.figure.exists(), f"{name} is missing; draw it with `make docs`"
    assert read_stamp(entry.figure) == entry.digest(entry.data()), (
        f"{name} is stale (or not drawn by make docs) for {relative(entry.source)}; regenerate with `make docs`"
    )


def test_every_figure_in_docs_is_drawn_by_make_docs():
    drawn = {relative(e.figure) for e in DOC_FIGURES}
    shipped = {relative(p) for p in (ROOT / "docs").glob("**/*.png")}
    assert shipped <= drawn, f"{sorted(shipped - drawn)} are not drawn by make docs: add them to scripts/make_docs.py"


def test_figures_waiting_for_data_still_lack_it():
    sources = {relative(e.figure): e.source for e in DOC_FIGURES}
    landed = [name for name in WAITING_FOR_DATA if sources[name].exists()]
    assert not landed, f"{landed}: the data is committed now; remove them from WAITING_FOR_DATA in tests/test_readme.py"


def test_a_figure_with_another_or_no_stamp_is_stale(tmp_path):
    """The staleness check fails a figure drawn from other data, and one saved without a stamp."""
    import matplotlib.pyplot as plt

    from rlhf_lib.core.figures import data_digest, read_stamp, save_figure_in, save_stamped

    data = {"methods": [{"kl": 1.0, "gold_score": 0.5}]}
    path = save_stamped(plt.figure(), tmp_path / "f.png", data_digest(data))
    assert read_stamp(path) == data_digest(json.loads(json.dumps(data)))
    data["methods"][0]["gold_score"] = 0.51
    assert read_stamp(path) != data_digest(data)
    assert read_stamp(save_figure_in(plt.figure(), tmp_path, "plain")) is None


def test_the_data_digest_follows_the_data_not_its_layout():
    from rlhf_lib.core.figures import data_digest

    rows = [{"episode": 8, "objective/kl": 0.1}, {"episode": 16, "objective/kl": 0.2}]
    assert data_digest(rows) == data_digest([{"objective/kl": 0.1, "episode": 8}, {"episode": 16, "objective/kl": 0.2}])
    assert data_digest(rows) != data_digest(rows[:1])
    assert data_digest(rows) != data_digest([{"episode": 8, "objective/kl": 0.1}, {"episode": 16, "objective/kl": 0.3}])
    assert data_digest(rows) != data_digest(list(reversed(rows)))  # the order of rows is data


def test_the_frontier_digest_changes_with_the_plotted_data():
    from rlhf_lib.sweeps import plots as sweep_plots

    figure = next(e.figure for e in DOC_FIGURES if e.figure.name == "sweep_frontier.png")
    summary = json.loads((figure.parent / "summary.json").read_text())
    changed = json.loads(json.dumps(summary))
    changed["frontier"][0]["gold_gain"] += 0.01
    assert sweep_plots.frontier_digest(changed) != sweep_plots.frontier_digest(summary)
    assert sweep_plots.frontier_digest(json.loads(json.dumps(summary))) == sweep_plots.frontier_digest(summary)
    unplotted = json.loads(json.dumps(summary))
    unplotted["wall_seconds"] = -1.0  # not drawn: the figure stays current
    assert sweep_plots.frontier_digest(unplotted) == sweep_plots.frontier_digest(summary)


def test_the_default_profile_takes_the_selecting_sweeps_choice():
    """The README says the default beta is the sweep's choice: the committed summary's selection is default.yaml's."""
    from rlhf_lib.sweeps import stats as sweep_stats

    summary = sweep_stats.load_summary(SELECTION_SWEEP)
    assert summary["complete"] and summary["selection"], f"{SELECTION_SWEEP.name}: the sweep is unfinished"
    chosen = summary["selection"]["overrides"]
    profile = {key: default_value(key) for key in chosen}
    assert profile == chosen, f"params/default.yaml has {profile} but the {SELECTION_SWEEP.name} sweep selects {chosen}"


def test_pending_items_have_not_landed():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    landed = [
        p for p in PENDING if (re.search(rf"^{p[5:]}\s*:", makefile, re.M) if p.startswith("make ") else path_exists(p))
    ]
    assert not landed, f"{sorted(landed)} now exist: remove them from PENDING in tests/test_readme.py"


def test_the_scanners_find_what_the_docs_write():
    text = (
        "run `make pipeline PARAMS=params/x.yaml` and see [perf](docs/p.md), `rlhf_lib/ppo/trainer.py:PPOConfig`,\n"
        "[web](https://x.org/a), `params/<yours>.yaml`.\n"
        '```bash\nmake bench ARGS="-p ppo.kl_coef=0.1"\npython scripts/a.py\n```\n'
    )
    assert mentioned_paths(text) == {"params/x.yaml", "docs/p.md", "rlhf_lib/ppo/trainer.py", "scripts/a.py"}
    assert "docs/p.md" in mentioned_paths("![fig](p.md)", "docs")
    assert {t for c in code_text(text) for t in MAKE_RE.findall(c)} == {"pipeline", "bench"}
    assert [m for c in code_text(text) for m in OVERRIDE_RE.findall(c)] == [("ppo", "kl_coef", "0.1")]


def write_generated() -> None:
    for path, marker in GENERATED:
        text = path.read_text(encoding="utf-8")
        pattern = re.compile(rf"<!-- {marker}:start -->.*?<!-- {marker}:end -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: no <!-- {marker}:start --> ... <!-- {marker}:end --> block to regenerate")
        path.write_text(pattern.sub(lambda _: generated_block(path, marker), text), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)} ({marker})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_readme.py --write   (regenerates the generated tables)")
    sys.path.insert(0, str(ROOT))
    write_generated()
