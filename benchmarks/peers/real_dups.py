"""Turn shared/data/real-dups into a peer-tool test folder, and score pair files against it.

Three subcommands, run inside the peers venv (they need only PIL, numpy, pandas, pyarrow):

    python real_dups.py prepare --src ../shared/data/real-dups --out /tmp/peertest
    python real_dups.py score --src ../shared/data/real-dups --pairs OUT/pairs_*.parquet --out OUT/scores.jsonl
    python real_dups.py table --runs OUT/peers.jsonl --scores OUT/scores.jsonl

`prepare` decodes every image with dedup's own decoder (`dedup.decode.decode_image`: EXIF orientation
applied, alpha composited on white, 16-bit and float images rescaled) and writes it as an RGB JPEG, so
the peer tools see the same pixels dedup sees and none of them trips over TIFF/WebP/16-bit quirks.
`score` counts pair precision and recall, where a true pair is two files with the same `group_id`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "real-dups"
# High quality, so re-encoding adds little next to the edits the set is made of.
JPEG_QUALITY = 95

sys.path.insert(0, str(REPO_ROOT))  # dedup is not installed in the peers venv; its decoder is pure Python
from dedup.decode import DecodeFailure, decode_image
from dedup.errors import DedupError


def sample_key(file_name: str) -> str:
    """The key a file gets in the test folder: its whole name with dots made underscores.

    The stem alone is not unique here (`hopper.png` and `hopper.webp` both exist), and LAION keys carry
    no dots, so `pillow__Tests__images__hopper.Lab.tif` becomes `pillow__Tests__images__hopper_Lab_tif`.
    """
    return Path(file_name).name.replace(".", "_")


@dataclass(frozen=True)
class TruthRow:
    file: str  # path relative to the real-dups folder
    key: str
    group_id: str
    kind: str


def read_truth(src: Path) -> list[TruthRow]:
    groups_csv = src / "groups.csv"
    if not groups_csv.is_file():
        raise DedupError(f"{groups_csv} not found", hint="pass --src pointing at shared/data/real-dups")
    with groups_csv.open(newline="") as handle:
        rows = [TruthRow(r["file"], sample_key(r["file"]), r["group_id"], r["kind"]) for r in csv.DictReader(handle)]
    keys = [row.key for row in rows]
    if len(set(keys)) != len(keys):
        raise DedupError("two files in groups.csv map to the same sample key", hint="rename one of them")
    return rows


def merge_groups(rows: list[TruthRow], merges: list[str]) -> list[TruthRow]:
    """Relabel groups per `FROM=INTO` specs: for scoring against a corrected truth without editing groups.csv."""
    known = {row.group_id for row in rows}
    mapping: dict[str, str] = {}
    for spec in merges:
        source, sep, target = spec.partition("=")
        if not sep or source not in known or target not in known:
            raise DedupError(
                f"--merge {spec!r} must be FROM=INTO with two group_ids from groups.csv",
                hint="copy both group_id values from groups.csv",
            )
        mapping[source] = target
    # A merged row is declared a copy, so it stops counting as a hard negative.
    return [
        TruthRow(row.file, row.key, mapping[row.group_id], "near") if row.group_id in mapping else row for row in rows
    ]


def true_pairs(rows: list[TruthRow]) -> set[tuple[str, str]]:
    by_group: dict[str, list[str]] = {}
    for row in rows:
        by_group.setdefault(row.group_id, []).append(row.key)
    pairs: set[tuple[str, str]] = set()
    for keys in by_group.values():
        pairs.update(itertools.combinations(sorted(keys), 2))
    return pairs


def prepare(src: Path, out: Path) -> int:
    """Write `<out>/<key>.jpg` for every image listed in groups.csv; returns how many were written."""
    rows = read_truth(src)
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        try:
            decoded = decode_image((src / row.file).read_bytes())
        except DecodeFailure as exc:
            raise DedupError(f"{row.file}: {exc.status}: {exc.message}", hint="fix or drop that file") from exc
        decoded.image.save(out / f"{row.key}.jpg", format="JPEG", quality=JPEG_QUALITY)
    return len(rows)


@dataclass(frozen=True)
class PairScore:
    pairs_file: str
    found_pairs: int
    true_pairs: int
    true_positives: int
    precision: float
    recall: float
    hard_negative_pairs: int  # found pairs that touch a documented non-match
    merges: list[str]  # the --merge corrections the truth was scored with


def score_pairs(pairs_file: Path, rows: list[TruthRow], merges: list[str]) -> PairScore:
    truth = true_pairs(rows)
    known_keys = {row.key for row in rows}
    hard_negatives = {row.key for row in rows if row.kind == "hard_negative"}
    frame = pd.read_parquet(pairs_file, columns=["key_a", "key_b"])
    found = set(zip(frame["key_a"], frame["key_b"], strict=True))
    unknown = {key for pair in found for key in pair} - known_keys
    if unknown:
        raise DedupError(
            f"{pairs_file} names keys that groups.csv does not: {sorted(unknown)[:3]}",
            hint="run the tool on the folder written by `real_dups.py prepare`",
        )
    hits = len(found & truth)
    return PairScore(
        pairs_file=str(pairs_file),
        found_pairs=len(found),
        true_pairs=len(truth),
        true_positives=hits,
        # No pairs found means no wrong claims: precision 1.0 by convention, recall tells the story.
        precision=hits / len(found) if found else 1.0,
        recall=hits / len(truth) if truth else 1.0,
        hard_negative_pairs=sum(1 for a, b in found if a in hard_negatives or b in hard_negatives),
        merges=merges,
    )


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown_table(runs_file: Path, scores_files: list[Path]) -> str:
    """One row per tool: timings from run_all.sh's peers.jsonl, then precision/recall per scores file."""
    # run_all.sh writes OUTDIR/pairs_<tool>.parquet, so the pairs file names the tool.
    scores = [
        {Path(str(line["pairs_file"])).stem.removeprefix("pairs_"): line for line in _read_jsonl(path)}
        for path in scores_files
    ]
    header = ["tool", "version", "images", "seconds", "images/s", "peak RSS MB", "pairs"]
    for path in scores_files:
        header += [f"P ({path.stem})", f"R ({path.stem})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in _read_jsonl(runs_file):
        cells = [run["tool"], run["version"], run["n_images"], run["seconds"], run["images_per_s"]]
        cells += [run["peak_rss_mb"], run["n_pairs"]]
        for by_tool in scores:
            score = by_tool.get(str(run["tool"]))
            if score is None:
                raise DedupError(f"no score for {run['tool']} in a scores file", hint="rerun `score` on all pairs")
            cells += [f"{score['precision']:.3f}", f"{score['recall']:.3f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="decode real-dups images into a folder of RGB JPEGs")
    prep.add_argument("--src", type=Path, default=DEFAULT_SRC)
    prep.add_argument("--out", type=Path, required=True)
    score = sub.add_parser("score", help="pair precision/recall of pairs parquet files")
    score.add_argument("--src", type=Path, default=DEFAULT_SRC)
    score.add_argument("--pairs", type=Path, nargs="+", required=True)
    score.add_argument("--out", type=Path, help="also write the scores here as JSON lines")
    score.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="FROM=INTO",
        help="score as if group FROM were part of group INTO (repeatable); groups.csv is not changed",
    )
    table = sub.add_parser("table", help="markdown table of run_all.sh timings and scores")
    table.add_argument("--runs", type=Path, required=True, help="peers.jsonl from run_all.sh")
    table.add_argument("--scores", type=Path, nargs="+", required=True, help="outputs of `score --out`")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.command == "prepare":
        count = prepare(args.src, args.out)
        print(json.dumps({"prepared": count, "out": str(args.out)}))
        return
    if args.command == "table":
        print(markdown_table(args.runs, args.scores))
        return
    rows = merge_groups(read_truth(args.src), args.merge)
    lines = [json.dumps(score_pairs(path, rows, args.merge).__dict__) for path in args.pairs]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except DedupError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(2)
