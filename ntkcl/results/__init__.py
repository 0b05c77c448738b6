"""Published results as data: each paper's tables as rows that `ntkcl reproduce` compares against.

One TOML file per paper (package data, `ntkcl/results/*.toml`), or a file of the same shape given with
`--results FILE`:

    [paper]            key, title, citation
    [tables.NAME]      table (as the paper numbers it), caption, page ("" where the source does not pin it),
                       transcribed_from, backbone (default of its rows), seeds (runs behind each published
                       number), run_seeds (the seeds ntkcl runs by default)
    [[tables.NAME.rows]]
                       method, stream, metric (a group metric: final_accuracy, mean_incremental_accuracy,
                       forgetting, backward_transfer, transfer, avg, last), mean, sd (absent when unpublished),
                       row and column (the table's labels), printed (the cell exactly as printed, from which
                       mean and sd must read back), and optionally backbone, set (`--set` assignments of the
                       ntkcl configuration), tolerance, quoted_in, note

A row's ntkcl configuration is its method's preset for its stream with its backbone and `set`; its
tolerance defaults to one published sd, at least 0.5 points. A row may name a method ntkcl does not have:
whether it exists is looked up in the method registry when the table is used, never recorded here.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ntkcl.errors import BadInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MINIMUM_TOLERANCE = 0.5
Metric = Literal[
    "final_accuracy", "mean_incremental_accuracy", "forgetting", "backward_transfer", "transfer", "avg", "last"
]
PRINTED = re.compile(r"(?P<mean>-?[0-9]+(?:\.[0-9]+)?)(?:\s*±\s*(?P<sd>[0-9]+(?:\.[0-9]+)?))?")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RowSpec(_Strict):
    method: str
    stream: str
    metric: Metric
    mean: float
    sd: float | None = Field(default=None, ge=0)
    row: str
    column: str
    printed: str
    backbone: str | None = None
    set: list[str] = Field(default_factory=list)
    tolerance: float | None = Field(default=None, gt=0)
    quoted_in: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _printed_reads_back(self) -> RowSpec:
        """mean and sd are the printed cell's numbers: nothing is typed twice without a check."""
        match = PRINTED.fullmatch(self.printed.strip())
        if match is None:
            raise ValueError(f"printed {self.printed!r} is not 'mean' or 'mean±sd'")
        sd = None if match["sd"] is None else float(match["sd"])
        if float(match["mean"]) != self.mean or sd != self.sd:
            raise ValueError(f"mean {self.mean} / sd {self.sd} do not read back from printed {self.printed!r}")
        return self


class TableSpec(_Strict):
    table: str
    caption: str
    page: str = ""
    transcribed_from: str
    backbone: str | None = None
    seeds: int = Field(ge=1)
    run_seeds: list[int] = Field(min_length=1)
    rows: list[RowSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _rows_have_backbones(self) -> TableSpec:
        if self.backbone is None and any(row.backbone is None for row in self.rows):
            raise ValueError("a row without a backbone needs the table's backbone")
        return self


class PaperSpec(_Strict):
    key: str
    title: str
    citation: str


class ResultsFile(_Strict):
    paper: PaperSpec
    tables: dict[str, TableSpec]


@dataclass(frozen=True)
class PublishedResult:
    """One published number with where it comes from and the ntkcl configuration that reproduces it."""

    table: str
    method: str
    stream: str
    backbone: str
    metric: str
    mean: float
    sd: float | None
    seeds: int
    source: str
    printed: str
    set: tuple[str, ...]
    tolerance: float
    note: str | None

    @property
    def configuration(self) -> tuple:
        """Rows with the same configuration share one seed group."""
        return (self.method, self.stream, self.backbone, self.set)

    @property
    def key(self) -> str:
        """`method/stream/metric`, what `--rows` patterns match."""
        return f"{self.method}/{self.stream}/{self.metric}"

    def record(self) -> dict:
        return {
            "table": self.table,
            "method": self.method,
            "stream": self.stream,
            "backbone": self.backbone,
            "metric": self.metric,
            "mean": self.mean,
            "sd": self.sd,
            "seeds": self.seeds,
            "source": self.source,
            "printed": self.printed,
            "set": list(self.set),
            "tolerance": self.tolerance,
            "note": self.note,
        }


@dataclass(frozen=True)
class PublishedTable:
    name: str
    paper: PaperSpec
    spec: TableSpec
    origin: str  # the file it was read from

    @property
    def run_seeds(self) -> list[int]:
        return list(self.spec.run_seeds)

    def results(self) -> list[PublishedResult]:
        spec = self.spec
        page = f"page {spec.page}" if spec.page else "page not pinned by the source"
        found = []
        for row in spec.rows:
            quoted = f"; quoted in {row.quoted_in}" if row.quoted_in else ""
            source = (
                f"{self.paper.citation}, {spec.table}, {page}: row {row.row!r}, column {row.column!r}, printed "
                f"{row.printed!r} (from {spec.transcribed_from}{quoted})"
            )
            tolerance = row.tolerance if row.tolerance is not None else max(row.sd or 0.0, MINIMUM_TOLERANCE)
            found.append(
                PublishedResult(
                    table=self.name,
                    method=row.method,
                    stream=row.stream,
                    backbone=row.backbone or spec.backbone,
                    metric=row.metric,
                    mean=row.mean,
                    sd=row.sd,
                    seeds=spec.seeds,
                    source=source,
                    printed=row.printed,
                    set=tuple(row.set),
                    tolerance=tolerance,
                    note=row.note,
                )
            )
        return found

    def select(self, pattern: str | None) -> list[PublishedResult]:
        """The rows whose `method/stream/metric` matches the shell pattern (`ntk-cl/*`, `*/cifar100/*`)."""
        rows = self.results()
        if pattern is None:
            return rows
        chosen = [row for row in rows if fnmatch.fnmatchcase(row.key, pattern)]
        if not chosen:
            raise BadInputError(f"--rows {pattern!r} matches no row of {self.name} (rows read method/stream/metric)")
        return chosen


def parse_results(text: str, origin: str) -> list[PublishedTable]:
    """The tables of one results file; BadInputError naming the file and the first problem."""
    try:
        document = ResultsFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        raise BadInputError(f"{origin} is not valid TOML: {error}") from error
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise BadInputError(f"{origin}: {where}: {problem['msg']}") from error
    return [PublishedTable(name, document.paper, spec, origin) for name, spec in document.tables.items()]


def packaged_files() -> list[str]:
    return sorted(item.name for item in resources.files(__package__).iterdir() if item.name.endswith(".toml"))


def load_tables(extra: Path | None = None) -> dict[str, PublishedTable]:
    """Every packaged table, plus those of `extra` (a results file of the same shape)."""
    sources = [(resources.files(__package__) / name, f"ntkcl/results/{name}") for name in packaged_files()]
    tables: dict[str, PublishedTable] = {}
    texts = [(resource.read_text(encoding="utf-8"), origin) for resource, origin in sources]
    if extra is not None:
        try:
            texts.append((extra.read_text(encoding="utf-8"), str(extra)))
        except OSError as error:
            raise BadInputError(f"cannot read results file {extra}: {error.strerror or error}") from error
    for text, origin in texts:
        for table in parse_results(text, origin):
            if table.name in tables:
                raise BadInputError(f"table {table.name} is defined in {tables[table.name].origin} and {origin}")
            tables[table.name] = table
    return tables


def get_table(name: str, extra: Path | None = None) -> PublishedTable:
    tables = load_tables(extra)
    if name not in tables:
        raise BadInputError(f"unknown table {name!r}; `ntkcl reproduce --list` shows them: {', '.join(tables)}")
    return tables[name]


def compare_row(row: PublishedResult, values: list[float | None], expected: int) -> dict:
    """Published row against ntkcl's per-seed values of its metric: mean ± sample sd, difference, verdict.

    Args:
        row: the published number.
        values: the metric of each finished ntkcl run (None where a run does not define it).
        expected: how many runs make a complete comparison (the seeds asked for).
    """
    defined = [float(value) for value in values if value is not None]
    n = len(defined)
    mean = sum(defined) / n if n else None
    sd = (sum((value - mean) ** 2 for value in defined) / (n - 1)) ** 0.5 if n > 1 else None
    difference = None if mean is None else mean - row.mean
    if not values:
        verdict = "not run"
    elif len(values) < expected:
        verdict = f"incomplete ({len(values)}/{expected} seeds)"
    elif difference is None:
        verdict = "metric undefined"
    else:
        verdict = "within" if abs(difference) <= row.tolerance else "outside"
    return {
        **row.record(),
        "key": row.key,
        "ntkcl_mean": mean,
        "ntkcl_sd": sd,
        "ntkcl_n": n,
        "difference": difference,
        "verdict": verdict,
    }


def matches_config(row: PublishedResult, config: dict) -> bool:
    """Whether a run's saved config (config.json) is the row's configuration: method, stream, backbone and
    every value the row's `set` assigns."""
    from ntkcl.config import parse_assignments

    backbone = config["backbone"]
    # A randomly initialised run is saved under its bare architecture (no tag claims weights it lacks).
    random_init = not backbone.get("pretrained", True) and backbone.get("weights") is None
    wanted = row.backbone.split(".", 1)[0] if random_init else row.backbone
    if (config["method"]["name"], config["stream"]["dataset"], backbone["name"]) != (row.method, row.stream, wanted):
        return False
    assigned, _ = parse_assignments(list(row.set))

    def contained(wanted: dict, actual: dict) -> bool:
        for key, value in wanted.items():
            if isinstance(value, dict):
                if not isinstance(actual.get(key), dict) or not contained(value, actual[key]):
                    return False
            elif actual.get(key) != value:
                return False
        return True

    return contained(assigned, config)
