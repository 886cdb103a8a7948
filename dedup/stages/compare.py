"""Contamination: which evaluation samples have copies in a training run (`dedup compare`).

The evaluation set is embedded into `DIR/eval_run` with the training run's own
descriptor settings (run.json), then every evaluation vector is range-searched
against the *training* index at the training run's threshold and re-scored
exactly from the stored training vectors (`query.search_external`, the search
`dedup query` uses). Nothing is searched train-vs-train or eval-vs-eval, and
byte-identical images (sha256) count too.

Outputs under DIR:
- `contamination.parquet`: one row per evaluation sample: `shard`, `key`,
  `sample_id`, `status`, `train_copies` (training samples matched *directly*
  above threshold; not a cluster size, no cap), `best_similarity`,
  `train_cluster_id` and `best_train_key` (of the best match), `matched_by`
  (`sha256` or the descriptor of the best match); rows without a copy have
  `train_copies` 0 and nulls.
- `contamination_pairs.parquet`: every (eval, train) match: `eval_sample_id`,
  `eval_shard`, `eval_key`, `train_sample_id`, `train_shard`, `train_key`,
  `train_cluster_id`, `similarity`, `matched_by`.
- `remove_from_train.parquet` / `remove_from_eval.parquet` (with
  `--remove-from`): the remove-list schema of `OUT/remove_keys.parquet`
  (`shard`, `key`, `sample_id`, `cluster_id`, `reason`), so `DropDuplicates`
  and `dedup export --remove` read them. Training removals are the direct
  matches (`eval_copy`) and the other members of their training clusters
  (`eval_copy_cluster`: copies of a copy, kept apart so they can be filtered).
- `report/index.html`: the contaminated pairs side by side.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from rich.console import Console

from dedup.errors import DedupError, StoreError
from dedup.records import (
    CONTAMINATION,
    CONTAMINATION_PAIRS,
    REMOVE_LIST,
    RunDir,
    load_samples,
    open_embeddings,
    write_record,
)
from dedup.settings import Settings

CONTAMINATION_COLUMNS = [
    "shard", "key", "sample_id", "status", "train_copies", "best_similarity",
    "train_cluster_id", "best_train_key", "matched_by",
]
PAIR_COLUMNS = [
    "eval_sample_id", "eval_shard", "eval_key", "train_sample_id", "train_shard", "train_key",
    "train_cluster_id", "similarity", "matched_by",
]
EXACT = "sha256"
# Evaluation vectors searched per range-search call: bounds the memory of the hit lists.
QUERY_BLOCK = 8192
# Contaminated pairs shown in the report (the parquet files hold all of them).
REPORT_PAIRS = 200
REMOVE_SIDES = ("train", "eval")


@dataclass
class Contamination:
    table: pd.DataFrame  # contamination.parquet
    pairs: pd.DataFrame  # contamination_pairs.parquet

    def summary(self) -> dict[str, float | int]:
        contaminated = int((self.table["train_copies"] > 0).sum())
        total = len(self.table)
        return {
            "eval_samples": total,
            "contaminated": contaminated,
            "share_contaminated": round(contaminated / total, 6) if total else 0.0,
            "train_samples_matched": int(self.pairs["train_sample_id"].nunique()),
        }


# ---------------------------------------------------------------- embedding the evaluation set


def embed_eval(train: RunDir, eval_shards: list[str], eval_dir: RunDir, workers: int | None = None,
               show_progress: bool = True) -> Settings:
    """Embed the evaluation shards into their own run with the training run's descriptors and settings."""
    from dataclasses import replace

    from dedup.run import Run
    from dedup.settings import EngineSettings
    from dedup.stages.embed import embed

    train_settings = Settings.load(train.run_config)
    requested = replace(train_settings, shard_specs=list(eval_shards), workers=workers,
                        engine=EngineSettings(show_progress=show_progress))
    if eval_dir.run_config.exists() and Settings.load(eval_dir.run_config).descriptor_options != train_settings.descriptor_options:
        raise StoreError(
            f"{eval_dir.root} was embedded with other descriptor settings than the training run",
            hint="delete that folder or choose another --out, then compare again",
        )
    run = Run.start(eval_dir.root, requested, given=frozenset({"descriptors"}))
    embed(run)
    return run.settings


# ---------------------------------------------------------------- matching eval against train


def descriptor_pairs(train: RunDir, eval_run: RunDir, name: str, threshold: float) -> pd.DataFrame:
    """(eval_sample_id, train_sample_id, similarity) of every eval vector's training copies for one descriptor."""
    from dedup.descriptors import query_transform_for
    from dedup.stages.index import load_index
    from dedup.stages.query import search_external

    index, spec = load_index(train.index_dir, name)
    # Memory maps: the eval set is read a block at a time, the training rows only where a hit is re-scored.
    train_vectors, eval_vectors = open_embeddings(train, name), open_embeddings(eval_run, name)
    train_ids, eval_ids = train_vectors.ids, eval_vectors.ids
    transform = query_transform_for(name)
    frames = [_pairs_frame(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), name)]
    for start in range(0, len(eval_vectors), QUERY_BLOCK):
        block = eval_vectors[start:start + QUERY_BLOCK]
        q, pos, sim = search_external(index, spec, train_vectors, block, threshold, transform)
        frames.append(_pairs_frame(eval_ids[start + q], train_ids[pos], sim, name))
    return pd.concat(frames, ignore_index=True)


def _pairs_frame(eval_ids: np.ndarray, train_ids: np.ndarray, similarity: np.ndarray, matched_by: str) -> pd.DataFrame:
    return pd.DataFrame({
        "eval_sample_id": np.asarray(eval_ids, np.int64),
        "train_sample_id": np.asarray(train_ids, np.int64),
        "similarity": np.asarray(similarity, np.float32),
        "matched_by": matched_by,
    })


def exact_pairs(train: RunDir, eval_samples: pd.DataFrame) -> pd.DataFrame:
    """Byte-identical images: equal sha256 (failed samples included, their bytes were hashed).

    The training samples table is read one part at a time, keeping only rows whose hash occurs in
    the evaluation set, so memory follows the evaluation set, not the training run.
    """
    left = eval_samples.loc[eval_samples["sha256"].notna(), ["sample_id", "sha256"]]
    wanted = sorted(set(left["sha256"]))
    frames = [pd.DataFrame({"sample_id": pd.Series(dtype="int64"), "sha256": pd.Series(dtype="object")})]
    for part in _sample_parts(train) if wanted else []:
        frames.append(pq.read_table(part, columns=["sample_id", "sha256"], filters=[("sha256", "in", wanted)]).to_pandas())
    joined = left.merge(pd.concat(frames, ignore_index=True), on="sha256", suffixes=("_eval", "_train"))
    similarity = np.ones(len(joined), np.float32)
    return _pairs_frame(joined["sample_id_eval"].to_numpy(), joined["sample_id_train"].to_numpy(), similarity, EXACT)


def _sample_parts(run: RunDir) -> list[Path]:
    parts = sorted((run.root / "samples").glob("samples_*.parquet"))
    if not parts:
        raise StoreError(f"{run.root} has no samples table", hint=f"run 'dedup embed SHARDS --out {run.root}' first")
    return parts


def train_rows(train: RunDir, column: str, values: set[int], columns: list[str]) -> pd.DataFrame:
    """Rows of the training clusters.parquet whose `column` is in `values`, streamed in batches."""
    frames = [pd.DataFrame({c: pd.Series(dtype="object") for c in columns})]
    if values:
        for batch in pq.ParquetFile(train.clusters).iter_batches(batch_size=262_144, columns=columns):
            frame = batch.to_pandas()
            frames.append(frame[frame[column].isin(values)])
    return pd.concat(frames, ignore_index=True)


def best_per_pair(pairs: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """One row per (eval, train) pair, best first: identical bytes, then the descriptor clearing its cut by most.

    Margins, not raw similarities, are compared: 0.96 under clip (cut 0.95) is a weaker match than
    0.9 under perceptual (cut 0.6), as in the cluster stage's explanation of a member.
    """
    cut = pairs["matched_by"].map(thresholds).astype("float64")
    margin = np.where(pairs["matched_by"] == EXACT, np.inf, pairs["similarity"].astype("float64") - cut)
    order = pairs.assign(_margin=margin).sort_values(["_margin", "eval_sample_id", "train_sample_id"],
                                                      ascending=[False, True, True], kind="stable")
    return order.drop_duplicates(["eval_sample_id", "train_sample_id"]).drop(columns=["_margin"])


def contamination_table(eval_samples: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation sample with its direct training copies and best match."""
    copies = pairs.groupby("eval_sample_id").size().rename("train_copies")
    best = pairs.drop_duplicates("eval_sample_id").set_index("eval_sample_id")  # pairs arrive best match first
    table = eval_samples[["shard", "key", "sample_id", "status"]].sort_values("sample_id", ignore_index=True)
    table["train_copies"] = table["sample_id"].map(copies).fillna(0).astype(np.int64)
    table["best_similarity"] = table["sample_id"].map(best["similarity"]).astype("float32")
    table["train_cluster_id"] = table["sample_id"].map(best["train_cluster_id"]).astype("Int64")
    table["best_train_key"] = table["sample_id"].map(best["train_key"])
    table["matched_by"] = table["sample_id"].map(best["matched_by"])
    return table[CONTAMINATION_COLUMNS]


def check_same_settings(train_config: Settings, eval_run: RunDir) -> None:
    """Vectors are only comparable when both runs used the same descriptors with the same settings."""
    from dedup.descriptors import describable

    eval_config = Settings.load(eval_run.run_config)
    for name in describable(train_config.descriptors):
        if name not in eval_config.descriptors:
            raise StoreError(f"the evaluation run {eval_run.root} has no {name!r} embeddings, the training run's descriptor",
                             hint="pass the evaluation shards instead of --eval-run: they are embedded with the training settings")
        if eval_config.descriptor_options.get(name, {}) != train_config.descriptor_options.get(name, {}):
            raise StoreError(f"{name} settings differ between the training run and {eval_run.root}",
                             hint="pass the evaluation shards instead of --eval-run: they are embedded with the training settings")


def match_runs(train: RunDir, eval_run: RunDir) -> Contamination:
    config = Settings.load(train.run_config)
    check_same_settings(config, eval_run)
    if not train.clusters.exists():
        raise StoreError(f"{train.root} has no clusters.parquet", hint=f"finish the training run first: 'dedup run SHARDS --out {train.root}'")
    eval_samples = load_samples(eval_run, ["sample_id", "shard", "key", "status", "sha256"])
    found = [exact_pairs(train, eval_samples)]
    # Vectors made outside dedup (precomputed) cannot describe the evaluation images: exact bytes and dedup's own.
    from dedup.descriptors import describable

    found += [descriptor_pairs(train, eval_run, name, float(config.thresholds[name]))
              for name in describable(config.descriptors)]
    pairs = best_per_pair(pd.concat(found, ignore_index=True), {k: float(v) for k, v in config.thresholds.items()})
    matched = train_rows(train, "sample_id", set(pairs["train_sample_id"].tolist()), ["sample_id", "shard", "key", "cluster_id"])
    pairs = _describe_pairs(pairs, matched.set_index("sample_id"), eval_samples.set_index("sample_id"))
    return Contamination(contamination_table(eval_samples, pairs), pairs)


def _describe_pairs(pairs: pd.DataFrame, train: pd.DataFrame, evaluation: pd.DataFrame) -> pd.DataFrame:
    described = pairs.assign(
        eval_shard=pairs["eval_sample_id"].map(evaluation["shard"]),
        eval_key=pairs["eval_sample_id"].map(evaluation["key"]),
        train_shard=pairs["train_sample_id"].map(train["shard"]),
        train_key=pairs["train_sample_id"].map(train["key"]),
        train_cluster_id=pairs["train_sample_id"].map(train["cluster_id"]).astype("int64"),
    )
    return described[PAIR_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- remove lists


def remove_from_train(train: RunDir, pairs: pd.DataFrame) -> pd.DataFrame:
    """Direct matches (`eval_copy`) and the rest of their training clusters (`eval_copy_cluster`)."""
    from dedup.stages.manifests import REMOVE_COLUMNS

    direct = set(pairs["train_sample_id"].tolist())
    # Every direct match lies in one of these clusters, so the cluster filter finds them all.
    rows = train_rows(train, "cluster_id", set(pairs["train_cluster_id"].tolist()), ["sample_id", "shard", "key", "cluster_id"])
    rows["reason"] = np.where(rows["sample_id"].isin(direct), "eval_copy", "eval_copy_cluster")
    rows["occurrence"] = rows["sample_id"].map(occurrences(train, rows["sample_id"])).astype("int32")
    return rows.sort_values("sample_id")[REMOVE_COLUMNS].reset_index(drop=True)


def occurrences(run: RunDir, sample_ids: pd.Series) -> pd.Series:
    """Occurrence (n-th sample with its key in its shard, from 0) of each sample id: the loader's identity."""
    from dedup.ids import split_sample_id
    from dedup.stages.manifests import with_occurrence

    shards = sorted({split_sample_id(int(i))[0] for i in sample_ids})
    rows = load_samples(run, ["sample_id", "shard_index", "key"])
    rows = with_occurrence(rows[rows["shard_index"].isin(shards)])
    return rows.set_index("sample_id")["occurrence"]


def remove_from_eval(eval_run: RunDir, table: pd.DataFrame) -> pd.DataFrame:
    from dedup.stages.manifests import REMOVE_COLUMNS

    rows = table[table["train_copies"] > 0].copy()
    rows["occurrence"] = rows["sample_id"].map(occurrences(eval_run, rows["sample_id"])).astype("int32")
    rows["cluster_id"] = rows["train_cluster_id"].astype("int64")
    rows["reason"] = "train_copy"
    return rows[REMOVE_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- the command


def compare(train_out: str | Path, out: str | Path, eval_shards: list[str] | None = None,
            eval_out: str | Path | None = None, remove_from: str | None = None, workers: int | None = None,
            with_report: bool = True, log: Console | None = None) -> dict[str, float | int]:
    """`dedup compare`: contamination of an evaluation set (shards, or a finished run) by a training run."""
    train, folder = RunDir(train_out), Path(out)
    if bool(eval_shards) == (eval_out is not None):
        raise DedupError("give evaluation shards or --eval-run, not both or neither",
                         hint="e.g. dedup compare runs/train eval/{000..009}.tar --out runs/contamination")
    if remove_from is not None and remove_from not in REMOVE_SIDES:
        raise DedupError(f"unknown --remove-from {remove_from!r}", hint="use --remove-from train or --remove-from eval")
    Settings.load(train.run_config)  # a clear message when TRAIN_OUT is not a run
    eval_run = RunDir(eval_out) if eval_out is not None else RunDir(folder / "eval_run")
    if eval_shards:
        embed_eval(train, eval_shards, eval_run, workers=workers, show_progress=log is not None)
    result = match_runs(train, eval_run)
    write_record(result.table, folder / "contamination.parquet", CONTAMINATION)
    write_record(result.pairs, folder / "contamination_pairs.parquet", CONTAMINATION_PAIRS)
    if remove_from == "train":
        write_record(remove_from_train(train, result.pairs), folder / "remove_from_train.parquet", REMOVE_LIST)
    elif remove_from == "eval":
        write_record(remove_from_eval(eval_run, result.table), folder / "remove_from_eval.parquet", REMOVE_LIST)
    if with_report:
        write_compare_report(folder, train, eval_run, result)
    return result.summary()


def summary_line(summary: dict[str, float | int]) -> str:
    return (f"contamination: {summary['contaminated']:,} of {summary['eval_samples']:,} evaluation samples "
            f"({100 * float(summary['share_contaminated']):.2f}%) have copies in the training set "
            f"({summary['train_samples_matched']:,} training samples matched)")


# ---------------------------------------------------------------- report page


def write_compare_report(folder: Path, train: RunDir, eval_run: RunDir, result: Contamination) -> Path:
    """DIR/report/index.html: summary and the contaminated pairs side by side (best match first)."""
    from dedup.stages.report import read_thumbnails

    shown = result.pairs.sort_values(["similarity", "eval_sample_id"], ascending=[False, True]).head(REPORT_PAIRS)
    from dedup.stages.report import _ThumbnailHtml

    eval_html = _ThumbnailHtml(read_thumbnails(eval_run.root, shown["eval_sample_id"].tolist()))
    train_html = _ThumbnailHtml(read_thumbnails(train.root, shown["train_sample_id"].tolist()))
    shown = shown.assign(eval_caption=shown["eval_sample_id"].map(_captions(eval_run, shown["eval_sample_id"])),
                         train_caption=shown["train_sample_id"].map(_captions(train, shown["train_sample_id"])))
    rows = "".join(_pair_row(pair, eval_html, train_html) for pair in shown.itertuples())
    document = _compare_page(summary_line(result.summary()), len(result.pairs), len(shown), rows, _shard_table(result.table))
    path = folder / "report" / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(document, encoding="utf-8")
    partial.replace(path)
    return path


def _captions(run: RunDir, sample_ids: pd.Series) -> pd.Series:
    from dedup.stages.report import sample_rows

    rows = sample_rows(run, sorted({int(i) for i in sample_ids}), ["caption"])
    return rows.set_index("sample_id")["caption"]


def _pair_row(pair, eval_html, train_html) -> str:
    from dedup.stages.report import MAX_KEY_CHARS, _text

    return (
        "<tr>"
        f"<td>{eval_html(pair.eval_sample_id, 'evaluation sample')}<code>{_text(pair.eval_key, MAX_KEY_CHARS)}</code>"
        f"<div class='caption small'>{_text(getattr(pair, 'eval_caption', None), 200)}</div></td>"
        f"<td>{train_html(pair.train_sample_id, 'training copy')}<code>{_text(pair.train_key, MAX_KEY_CHARS)}</code>"
        f"<div class='caption small'>{_text(getattr(pair, 'train_caption', None), 200)}</div></td>"
        f"<td class='num'>{float(pair.similarity):.3f}</td><td>{_text(pair.matched_by, 40)}</td>"
        f"<td class='num'>{int(pair.train_cluster_id)}</td></tr>"
    )


def per_shard(table: pd.DataFrame) -> pd.DataFrame:
    """Per evaluation shard: samples, contaminated samples and their share (benchmarks often are one shard set each)."""
    grouped = table.assign(contaminated=table["train_copies"] > 0).groupby("shard", sort=True)
    frame = pd.DataFrame({"samples": grouped.size(), "contaminated": grouped["contaminated"].sum().astype("int64")})
    frame["share"] = frame["contaminated"] / frame["samples"]
    return frame.reset_index()


def _shard_table(table: pd.DataFrame) -> str:
    from dedup.stages.report import MAX_URL_CHARS, _text

    body = "".join(f"<tr><td>{_text(r.shard, MAX_URL_CHARS)}</td><td class='num'>{r.samples:,}</td>"
                   f"<td class='num'>{r.contaminated:,}</td><td class='num'>{100 * r.share:.2f}%</td></tr>"
                   for r in per_shard(table).itertuples())
    return ("<section id='shards'><h2>By evaluation shard</h2><table class='grid'><tr><th>shard</th><th>samples</th>"
            f"<th>with training copies</th><th>share</th></tr>{body}</table></section>")


def _compare_page(summary: str, total_pairs: int, shown: int, rows: str, shards: str = "") -> str:
    from dedup.stages.report import _CSP, _CSS

    note = f"{shown:,} of {total_pairs:,} pairs shown, most similar first" if total_pairs else "no contaminated pairs"
    table = ("<table class='grid'><tr><th>evaluation sample</th><th>training copy</th><th>similarity</th>"
             f"<th>matched by</th><th>training cluster</th></tr>{rows}</table>") if rows else ""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='referrer' content='no-referrer'><title>dedup contamination</title>"
        f"<style>{_CSS}</style></head><body><header><h1>dedup contamination</h1>"
        f"<p>{html.escape(summary)}</p></header><main>{shards}<section id='pairs'><h2>Contaminated pairs "
        f"<span class='muted small'>{note}</span></h2>{table}</section></main></body></html>"
    )
