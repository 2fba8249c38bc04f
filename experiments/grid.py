"""An experiment grid as data: configs/experiments/<name>.yaml, validated in one place.

    description: what the grid measures
    config: configs/c4_small.yaml        # base run config every run starts from
    data: {tokenizer: sentencepiece, vocab: 8000, eval_tokens: 65536, dir: runs/experiments/data}
    out: runs/experiments/<name>         # run directories (resumable: a finished run is skipped)
    results: docs/results/<name>         # report prefix (.csv, .json, _table.md, _*.png)
    baseline: dense_1200                 # default row the relative columns compare with
    defaults: {section.field: value}     # --set overrides of every run
    runs:
      - name: vq_K512_r8_1200            # unique
        group: refine                    # free text, a table section
        set: {section.field: value}      # this run's overrides (nested dicts allowed: model.vq: {...};
                                         #   model.vq.refine_rank: 8 sets one key of the base config's dict)
        seeds: [1234, 2, 3]              # optional: one run per seed, named <name>_seed<s> (first keeps <name>)
        repeats: 3                       # optional (not with seeds): identical runs <name>_r0 .. _r2, e.g.
                                         #   for timing; the report keeps one row <name> with their median
        baseline: dense_600              # optional: compare with another row
        source: {run: dense_1200, step: 100}   # optional: start from another run's checkpoint at `step`
        use: [embeddings, body]          # with source: its dense head rows (k-means map / SVD refinement)
                                         #   and/or its body weights; `steps` then counts from `step`
        source_only: true                # optional: trained only as far as the runs that use it need
    plots:
      loss_curves: {title: [runs]}       # <results>_loss_<title>.png, training loss against step
      pareto: {metric: c4_ppl, runs: [...]}   # <results>_pareto.png, metric against head parameters
      ppl_vs_K: {metrics: [c4_ppl], series: {label: [runs]}, reference: dense}   # <results>_ppl_vs_K.png
    report:
      unigram: true                      # add the row "unigram (no training)": the add-one smoothed unigram
                                         #   of the baseline run's training data on its eval windows

Run order: file order; with `repeats`, round-robin (the first repeat of every run, then the second, ...),
so that a slow spell of a shared machine does not fall on one run's repeats only. A row name (baseline,
plots) is a run's name, or the name of a run with `repeats` (its median row).

YAML anchors (&vq / <<: *vq) keep the variants short (`templates:` holds anchors and is otherwise ignored).
A run with `source` needs that run's checkpoint at `step`: the runner trains the source with
--exit-after-steps when it has not got that far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["Grid", "RunSpec", "load_grid", "overrides"]

_TOP = {"description", "config", "data", "out", "results", "baseline", "defaults", "runs", "plots", "report",
        "templates"}
_RUN = {"name", "group", "set", "seeds", "repeats", "baseline", "source", "use", "source_only"}
_USES = ("embeddings", "body")
_PLOTS = {"loss_curves", "pareto", "ppl_vs_K", "loss_gap"}
_REPORT = {"unigram"}


@dataclass
class RunSpec:
    name: str
    group: str
    settings: dict
    entry: str = ""                 # the grid entry it was expanded from (seeds, repeats)
    seed: int | None = None
    repeat: int | None = None
    baseline: str | None = None
    source: dict | None = None
    use: tuple = ()
    source_only: bool = False

    @property
    def steps(self) -> int | None:
        return self.settings.get("training.steps")


@dataclass
class Grid:
    name: str
    description: str
    config: str
    data: dict
    out: Path
    results: Path
    baseline: str | None
    runs: list[RunSpec]
    plots: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def run(self, name: str) -> RunSpec:
        for spec in self.runs:
            if spec.name == name:
                return spec
        raise KeyError(f"grid {self.name} has no run {name!r}")

    @property
    def row_names(self) -> list[str]:
        """Names of the report's rows: every run, the repeats of a run as one row."""
        names = []
        for spec in self.runs:
            name = spec.name if spec.repeat is None else spec.entry
            if name not in names:
                names.append(name)
        return names


def _flatten(settings: dict, prefix: str = "") -> dict:
    """{'model': {'vq': {...}}} -> {'model.vq': {...}}: only the first two levels are paths (section.field);
    deeper mappings are values (model.vq is one field holding a dict)."""
    out = {}
    for key, value in settings.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path.count(".") == 0 and "." not in key:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _check_entry(entry, where: str) -> None:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{where}: every run needs a name")
    bad = set(entry) - _RUN
    if bad:
        raise ValueError(f"{where} ({entry['name']}): unknown keys {sorted(bad)}")
    use = entry.get("use") or ()
    if set(use) - set(_USES) or (use and "source" not in entry):
        raise ValueError(f"{where}: `use` takes {_USES} and needs a `source`")
    source = entry.get("source")
    if source is not None and (not isinstance(source, dict) or set(source) != {"run", "step"}
                               or not isinstance(source["step"], int)):
        raise ValueError(f"{where}: source must be {{run: NAME, step: INT}}, got {source!r}")
    repeats = entry.get("repeats")
    if repeats is not None and (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1):
        raise ValueError(f"{where}: repeats must be an integer >= 1, got {repeats!r}")
    if repeats is not None and entry.get("seeds"):
        raise ValueError(f"{where}: a run takes seeds or repeats, not both")


def _expand(entry: dict, defaults: dict) -> list[RunSpec]:
    """The runs of one grid entry: one per seed, one per repeat, or just the entry."""
    name, settings = entry["name"], {**defaults, **_flatten(entry.get("set") or {})}
    common = dict(group=entry.get("group", ""), entry=name, baseline=entry.get("baseline"),
                  source=entry.get("source"), use=tuple(entry.get("use") or ()),
                  source_only=bool(entry.get("source_only")))
    if entry.get("repeats"):
        return [RunSpec(name=f"{name}_r{i}", settings=dict(settings), seed=settings.get("training.seed"),
                        repeat=i, **common) for i in range(entry["repeats"])]
    runs = []
    for j, seed in enumerate(entry.get("seeds") or [None]):
        run_settings = dict(settings) if seed is None else {**settings, "training.seed": seed}
        runs.append(RunSpec(name=name if j == 0 else f"{name}_seed{seed}", settings=run_settings,
                            seed=run_settings.get("training.seed"), **common))
    return runs


def _round_robin(expanded: list[list[RunSpec]]) -> list[RunSpec]:
    """Repeat i of every entry before repeat i+1 of any; other runs keep their place in the first round."""
    rounds: list[list[RunSpec]] = []
    for runs in expanded:
        for spec in runs:
            i = spec.repeat or 0
            rounds += [[] for _ in range(i + 1 - len(rounds))]
            rounds[i].append(spec)
    return [spec for round_ in rounds for spec in round_]


def _plot_refs(plots: dict) -> list[str]:
    """Every row name the plots refer to."""
    names = [n for runs in (plots.get("loss_curves") or {}).values() for n in runs]
    names += (plots.get("pareto") or {}).get("runs", [])
    names += (plots.get("loss_gap") or {}).get("runs", []) + (plots.get("loss_gap") or {}).get("also_vs", [])
    by_k = plots.get("ppl_vs_K") or {}
    names += [n for runs in (by_k.get("series") or {}).values() for n in runs]
    names += [by_k["reference"]] if "reference" in by_k else []
    return names


def _check_references(path: Path, raw: dict, runs: list[RunSpec], rows: list[str]) -> None:
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate run names {duplicates}")
    for spec in runs:
        if spec.baseline is not None and spec.baseline not in rows:
            raise ValueError(f"{path}: run {spec.name} refers to unknown run {spec.baseline!r}")
        if spec.source is not None and spec.source["run"] not in names:
            raise ValueError(f"{path}: run {spec.name} refers to unknown run {spec.source['run']!r}")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in rows:
        raise ValueError(f"{path}: baseline {baseline!r} is not a run of the grid")
    plots, report = raw.get("plots") or {}, raw.get("report") or {}
    for section, value, known in (("plots", plots, _PLOTS), ("report", report, _REPORT)):
        if set(value) - known:
            raise ValueError(f"{path}: unknown {section} keys {sorted(set(value) - known)}; valid: {sorted(known)}")
    unknown = sorted({n for n in _plot_refs(plots) if n not in rows})
    if unknown:
        raise ValueError(f"{path}: plots refer to unknown runs {unknown}")


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment grid {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    name = path.stem
    unknown = set(raw) - _TOP
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    defaults = _flatten(raw.get("defaults") or {})
    entries = raw.get("runs") or []
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path}: runs[{i}]")
    runs = _round_robin([_expand(entry, defaults) for entry in entries])
    grid = Grid(name=name, description=raw.get("description", ""), config=raw.get("config", "configs/c4_small.yaml"),
                data=raw.get("data") or {}, out=Path(raw.get("out", f"runs/experiments/{name}")),
                results=Path(raw.get("results", f"docs/results/{name}")), baseline=raw.get("baseline"), runs=runs,
                plots=raw.get("plots") or {}, report=raw.get("report") or {})
    _check_references(path, raw, runs, grid.row_names)
    return grid


def overrides(settings: dict) -> list[str]:
    """`--set` strings for the training driver (values as YAML flow text)."""
    out = []
    for key, value in settings.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        out.append(f"{key}={text}")
    return out
