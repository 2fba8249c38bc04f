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
        set: {section.field: value}      # this run's overrides (nested dicts allowed: model.vq: {...})
        seeds: [1234, 2, 3]              # optional: one run per seed, named <name>_seed<s> (first keeps <name>)
        baseline: dense_600              # optional: compare with another row
        source: {run: dense_1200, step: 100}   # optional: start from another run's checkpoint at `step`
        use: [embeddings, body]          # with source: its dense head rows (k-means map / SVD refinement)
                                         #   and/or its body weights; `steps` then counts from `step`
        source_only: true                # optional: trained only as far as the runs that use it need
    plots: {loss_curves: {name: [runs]}, pareto: {metric: c4_ppl, runs: [...]}}

YAML anchors (&vq / <<: *vq) keep the variants short. A run with `source` needs that run's checkpoint at
`step`: the runner trains the source with --exit-after-steps when it has not got that far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["Grid", "RunSpec", "load_grid", "overrides"]

_USES = ("embeddings", "body")


@dataclass
class RunSpec:
    name: str
    group: str
    settings: dict
    seed: int | None = None
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

    def run(self, name: str) -> RunSpec:
        for spec in self.runs:
            if spec.name == name:
                return spec
        raise KeyError(f"grid {self.name} has no run {name!r}")


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


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment grid {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    name = path.stem
    unknown = set(raw) - {"description", "config", "data", "out", "results", "baseline", "defaults", "runs",
                          "plots", "templates"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    defaults = _flatten(raw.get("defaults") or {})
    runs: list[RunSpec] = []
    for i, entry in enumerate(raw.get("runs") or []):
        where = f"{path}: runs[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{where}: every run needs a name")
        bad = set(entry) - {"name", "group", "set", "seeds", "baseline", "source", "use", "source_only"}
        if bad:
            raise ValueError(f"{where} ({entry['name']}): unknown keys {sorted(bad)}")
        use = tuple(entry.get("use") or ())
        if set(use) - set(_USES) or (use and "source" not in entry):
            raise ValueError(f"{where}: `use` takes {_USES} and needs a `source`")
        source = entry.get("source")
        if source is not None and (set(source) != {"run", "step"} or not isinstance(source["step"], int)):
            raise ValueError(f"{where}: source must be {{run: NAME, step: INT}}, got {source!r}")
        settings = {**defaults, **_flatten(entry.get("set") or {})}
        seeds = entry.get("seeds") or [None]
        for j, seed in enumerate(seeds):
            run_name = entry["name"] if j == 0 else f"{entry['name']}_seed{seed}"
            run_settings = dict(settings) if seed is None else {**settings, "training.seed": seed}
            runs.append(RunSpec(name=run_name, group=entry.get("group", ""), settings=run_settings,
                                seed=run_settings.get("training.seed"), baseline=entry.get("baseline"),
                                source=source, use=use, source_only=bool(entry.get("source_only"))))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate run names {duplicates}")
    for spec in runs:
        for ref in filter(None, (spec.baseline, (spec.source or {}).get("run"))):
            if ref not in names:
                raise ValueError(f"{path}: run {spec.name} refers to unknown run {ref!r}")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in names:
        raise ValueError(f"{path}: baseline {baseline!r} is not a run of the grid")
    return Grid(name=name, description=raw.get("description", ""), config=raw.get("config", "configs/c4_small.yaml"),
                data=raw.get("data") or {}, out=Path(raw.get("out", f"runs/experiments/{name}")),
                results=Path(raw.get("results", f"docs/results/{name}")), baseline=baseline, runs=runs,
                plots=raw.get("plots") or {})


def overrides(settings: dict) -> list[str]:
    """`--set` strings for the training driver (values as YAML flow text)."""
    out = []
    for key, value in settings.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")]
        out.append(f"{key}={text}")
    return out
