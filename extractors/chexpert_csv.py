"""Read CheXpert-style label tables into long format: (study_id, observation, value).

MIMIC-CXR's ``mimic-cxr-2.0.0-chexpert.csv`` has subject_id, study_id (integers, without
the "s" of the file names) and the 14 observation columns coded 1.0 / 0.0 / -1.0 / blank.
Study ids follow extractors/sources.py: the digits without the "s" prefix ("50414267").
A generic gold table works too: any id column, any label columns (renamed to CheXpert
names through an alias map), values as codes or words ("positive", "uncertain" ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from schemas.labels import OBSERVATIONS

MIMIC_CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
VALUES = ("positive", "negative", "uncertain", "not_mentioned")
LONG_SCHEMA = {"study_id": pl.String, "observation": pl.String, "value": pl.String}

_WORDS = {
    "1": "positive", "1.0": "positive", "positive": "positive", "pos": "positive", "yes": "positive",
    "true": "positive", "present": "positive",
    "0": "negative", "0.0": "negative", "-0.0": "negative", "negative": "negative", "neg": "negative",
    "no": "negative", "false": "negative", "absent": "negative",
    "-1": "uncertain", "-1.0": "uncertain", "uncertain": "uncertain", "u": "uncertain",
    "": "not_mentioned", "nan": "not_mentioned", "na": "not_mentioned", "n/a": "not_mentioned",
    "none": "not_mentioned", "null": "not_mentioned", "not_mentioned": "not_mentioned",
    "not mentioned": "not_mentioned", "blank": "not_mentioned",
}
_PREFIXED_ID = re.compile(r"^[sS](\d+)$")
_FLOAT_ID = re.compile(r"^(\d+)\.0+$")


class LabelTableError(ValueError):
    """A label table that cannot be used (missing id column, no label column ...)."""


def parse_value(raw: object) -> str | None:
    """A CheXpert cell as positive/negative/uncertain/not_mentioned; None when unreadable."""
    if raw is None:
        return "not_mentioned"
    if isinstance(raw, float) and math.isnan(raw):
        return "not_mentioned"
    if isinstance(raw, bool):
        return "positive" if raw else "negative"
    if isinstance(raw, (int, float)):
        raw = f"{float(raw):.1f}"
    return _WORDS.get(str(raw).strip().lower())


def normalize_study_id(raw: object) -> str | None:
    """"s50414267", 50414267, "50414267.0" -> "50414267"; other text is kept as written."""
    if raw is None:
        return None
    if isinstance(raw, float):
        if math.isnan(raw):
            return None
        raw = int(raw) if raw.is_integer() else raw
    text = str(raw).strip()
    if not text:
        return None
    m = _PREFIXED_ID.match(text) or _FLOAT_ID.match(text)
    return m.group(1) if m else text


def load_aliases(path: Path | str | None) -> dict[str, str]:
    """Gold label name -> CheXpert name, from YAML (a mapping) or CSV (two columns)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alias file not found: {path}")
    if path.suffix.lower() in (".yml", ".yaml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise LabelTableError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, Mapping):
            raise LabelTableError(f"{path}: expected a mapping of gold label names to CheXpert names")
        pairs = [(str(k), str(v)) for k, v in data.items() if v is not None]
    else:
        try:
            df = pl.read_csv(path, infer_schema=False, has_header=True)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise LabelTableError(f"{path}: cannot read the alias CSV: {e}") from e
        if df.width < 2:
            raise LabelTableError(f"{path}: the alias CSV needs two columns (gold name, CheXpert name)")
        pairs = [(str(a), str(b)) for a, b in df.select(df.columns[:2]).iter_rows() if a and b]
    out = {}
    for gold, chexpert in pairs:
        canonical = canonical_observation(chexpert)
        if canonical is None:
            raise LabelTableError(f"{path}: {chexpert!r} is not a CheXpert observation ({', '.join(OBSERVATIONS)})")
        out[gold.strip()] = canonical
    return out


def canonical_observation(name: str) -> str | None:
    """"pleural_effusion", "Pleural Effusion", "PLEURAL-EFFUSION" -> "Pleural Effusion"."""
    key = re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()
    for o in OBSERVATIONS:
        if o.lower() == key:
            return o
    return None


def alias_columns(columns: Sequence[str], aliases: Mapping[str, str] | None = None
                  ) -> tuple[dict[str, list[str]], list[str]]:
    """CheXpert observation -> every table column that names it (several may: Mass and Nodule ->
    Lung Lesion), in column order, and the columns that name none."""
    aliases = dict(aliases or {})
    mapped: dict[str, list[str]] = {}
    unmapped = []
    for col in columns:
        target = aliases.get(col) or canonical_observation(col)
        if target is None:
            unmapped.append(col)
        else:
            mapped.setdefault(target, []).append(col)
    return mapped, unmapped


def label_columns(columns: list[str], aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Table column -> CheXpert observation, for the columns that name one (the first column of each)."""
    return {cols[0]: target for target, cols in alias_columns(columns, aliases)[0].items()}


def to_long(df: pl.DataFrame, *, id_col: str, aliases: Mapping[str, str] | None = None,
            strict: bool = True, normalize_ids: bool = True, trim_ids: bool = True) -> pl.DataFrame:
    """A wide label table -> (study_id, observation, value), one row per id and label column.

    Unreadable cells raise LabelTableError when ``strict``; otherwise they become
    not_mentioned (the stage must not die on one bad cell of a 227k-row CSV). Rows
    without an id are dropped; a repeated (id, observation) keeps its first row.
    ``normalize_ids`` strips MIMIC's "s" prefix and a float's ".0"; pass False for tables
    whose ids the ingest stage keeps as written.
    Vectorised in polars: MIMIC's CSV has 3.2 million cells.
    """
    if id_col not in df.columns:
        raise LabelTableError(f"id column {id_col!r} not found; columns: {', '.join(df.columns)}")
    mapping = label_columns([c for c in df.columns if c != id_col], aliases)
    if not mapping:
        raise LabelTableError(
            f"no label column found among {', '.join(df.columns)}; name them as CheXpert observations "
            "or pass an alias table")
    wide = df.select(
        _study_id_expr(pl.col(id_col).cast(pl.String), normalize_ids, trim_ids).alias("study_id"),
        *(pl.col(c).cast(pl.String).alias(o) for c, o in mapping.items()),
    ).with_row_index("_row")
    long = wide.unpivot(index=["_row", "study_id"], variable_name="observation", value_name="raw")
    clean = pl.col("raw").str.strip_chars().str.to_lowercase()
    number = clean.cast(pl.Float64, strict=False)
    value = (
        pl.when(pl.col("raw").is_null()).then(pl.lit("not_mentioned"))
        .when(number == 1.0).then(pl.lit("positive"))
        .when(number == 0.0).then(pl.lit("negative"))
        .when(number == -1.0).then(pl.lit("uncertain"))
        .when(number.is_nan()).then(pl.lit("not_mentioned"))
        .otherwise(clean.replace_strict(_WORDS, default=None, return_dtype=pl.String))
    )
    long = long.with_columns(value.alias("value")).filter(pl.col("study_id").is_not_null())
    bad = long.filter(pl.col("value").is_null())
    if bad.height:
        if strict:
            first = bad.row(0, named=True)
            raise LabelTableError(
                f"row {first['_row'] + 1}, column {first['observation']!r}: unreadable label {first['raw']!r} "
                f"(expected 1.0 / 0.0 / -1.0 / blank); {bad.height} such cell(s)")
        long = long.with_columns(pl.col("value").fill_null("not_mentioned"))
    out = long.select("study_id", "observation", "value").cast(LONG_SCHEMA)
    return out.unique(["study_id", "observation"], keep="first", maintain_order=True)


def _study_id_expr(col: pl.Expr, normalize: bool = True, trim: bool = True) -> pl.Expr:
    """normalize_study_id as a polars expression (only trimming when not ``normalize``; ids kept
    exactly as written, blanks included, when neither: a report table's ids, see extractors/sources.py)."""
    text = col.str.strip_chars() if trim or normalize else col
    if not (trim or normalize):
        return pl.when(col.str.strip_chars().str.len_chars() > 0).then(col)
    if normalize:
        text = text.str.replace(r"^[sS](\d+)$", "$1").str.replace(r"^(\d+)\.0+$", "$1")
    return pl.when(text.str.len_chars() > 0).then(text)


def read_label_table(path: Path | str, *, id_col: str | None = None, aliases: Mapping[str, str] | None = None,
                     strict: bool = True) -> pl.DataFrame:
    """Read a CSV / Parquet / JSONL label table into long format (see ``to_long``).

    ``id_col`` defaults to "study_id" (MIMIC's column) when present.
    """
    df = read_table(path)
    if id_col is None:
        if "study_id" not in df.columns:
            raise LabelTableError(f"{path}: no study_id column; name the id column")
        id_col = "study_id"
    return to_long(df, id_col=id_col, aliases=aliases, strict=strict)


def read_chexpert_csv(path: Path | str, *, strict: bool = False) -> pl.DataFrame:
    """MIMIC-CXR's chexpert CSV in long format (lenient by default: bad cells -> not_mentioned)."""
    return read_label_table(path, id_col="study_id", strict=strict)


def scan_table(path: Path | str) -> pl.LazyFrame:
    """A lazy scan of a CSV / TSV / Parquet / JSONL table (CSV columns as text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            return pl.scan_parquet(path)
        if any(s in suffixes for s in (".jsonl", ".ndjson", ".json")):
            return pl.scan_ndjson(path, infer_schema_length=None)
        separator = "\t" if ".tsv" in suffixes else ","
        return pl.scan_csv(path, infer_schema=False, separator=separator, truncate_ragged_lines=True)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise LabelTableError(f"{path}: cannot read the table: {e}") from e


def read_table(path: Path | str, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a table (optionally only ``columns``) with every column as text, so labels
    keep their blanks and ids keep their leading zeros."""
    lf = scan_table(path)
    try:
        if columns is not None:
            lf = lf.select(columns)
        return lf.collect().with_columns(pl.all().cast(pl.String))
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        raise LabelTableError(f"{path}: cannot read the table: {e}") from e


def table_columns(path: Path | str) -> list[str]:
    """Column names of a table without reading its rows."""
    try:
        return scan_table(path).collect_schema().names()
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        raise LabelTableError(f"{path}: cannot read the table: {e}") from e
