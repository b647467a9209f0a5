"""Raw skeletons -> compact arrays (the core of `python -m service.prepare DATASET --raw DIR --out DIR`).

DATASET is one of ntu60, ntu120, pku, kinetics, synthetic.

Every file is parsed and preprocessed in worker processes (chunks of files, a progress bar on stderr), each
finished chunk is cached as a shard under `<out>/.parts/`, so a run that crashed resumes where it stopped;
a run whose inputs and options match `<out>/prepare.json` does nothing. Outputs, each written atomically:

- `data.npy`   (N, C=3, T=--frames, V, M=2) float32 (float16 with --dtype float16): the joint stream after
               centring on the spine middle, aligning spine/shoulders to y/x and resampling (NTU, PKU,
               synthetic); Kinetics (V=18: x, y, OpenPose score): x, y - 0.5 where detected, then resampled.
- `label.npy`  (N,) int64: 0-based class ids (NTU/PKU/synthetic action - 1; Kinetics label_index as written).
- `index.tsv`  one row per sample, in data.npy order: name, label, setup, camera, performer, replication and
               one train/test column per benchmark ('-' where the sample is outside it; NTU fields empty for
               PKU and Kinetics). NTU benchmarks split by sample name; `kinetics` by the release folder
               (kinetics_train/ trains, kinetics_val/ tests); `pku-xsub` / `pku-xview` by the official lists
               given with --split-list (cross-subject.txt, cross-view.txt).
- `skipped.tsv` name, path, reason of every file that could not be used (corrupt, truncated, empty, bad name,
               duplicate); those files are never zero-filled into data.npy.
- `prepare.json` the options, counts and the stamp that makes a re-run a no-op (written last).
- synthetic only: `class_names.txt`, `descriptions.txt` copied from the generated set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from trainers.errors import InputError
from trainers.guards import MAX_ABS_INPUT
from trainers.io import atomic_write, atomic_write_text, stable_hash
from trainers.skeleton.kinetics import read_kinetics
from trainers.skeleton.ntu import load_missing_list, parse_sample_name, read_skeleton, to_array
from trainers.skeleton.pku import read_pku_labels, read_pku_skeleton
from trainers.skeleton.prepared import content_problem, content_record
from trainers.skeleton.preprocess import image_pipeline, ntu_pipeline
from trainers.skeleton.splits import BENCHMARKS, KINETICS_FOLDERS, get_benchmark, kinetics_split, read_split_list
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES

PIPELINE_VERSION = 3          # bump when parsing or preprocessing changes: invalidates shards and stamps
# Class counts of the label-carrying formats: a label outside them is a corrupt file, skipped with its reason.
KINETICS_CLASSES = BENCHMARKS["kinetics"].num_classes
PKU_CLASSES = BENCHMARKS["pku-xsub"].num_classes
BODIES = 2
DATASETS = ("ntu60", "ntu120", "pku", "kinetics", "synthetic")
# pku: the benchmarks given a list with --split-list
DEFAULT_BENCHMARKS = {"ntu60": ["ntu60-xsub", "ntu60-xview"], "ntu120": ["ntu120-xsub", "ntu120-xset"],
                      "synthetic": ["ntu60-xsub", "ntu60-xview"], "kinetics": ["kinetics"]}
FAMILY = {"ntu60": "ntu", "ntu120": "ntu", "synthetic": "ntu", "kinetics": "kinetics", "pku": "pku"}
NTU_LIMITS = {"ntu60": (60, 17), "ntu120": (120, 32), "synthetic": (SYNTHETIC_CLASSES, 17)}   # (actions, setups)
INDEX_FIELDS = ["name", "label", "setup", "camera", "performer", "replication"]


@dataclass(frozen=True)
class Job:
    """One input file (PKU: a skeleton file and its label file) and how to turn it into samples."""

    dataset: str
    path: str
    labels: str = ""                    # PKU label file

    def fingerprint(self) -> list:
        files = [self.path] + ([self.labels] if self.labels else [])
        return [[f, *_size_mtime(Path(f))] for f in files]


def _size_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------------------------
# Parsing one file (runs in worker processes)
# ----------------------------------------------------------------------------------------------

Result = tuple   # ("ok", name, label, array (M, T, V, C) float32, job path) | ("skip", name, path, reason)


def process_job(job: Job, frames: int) -> list[Result]:
    """Parse and preprocess one file; bad input becomes a ("skip", ...) result, never an exception.

    Any exception while reading one file (not only InputError: a MemoryError or OverflowError from a corrupt
    count, a RecursionError from absurd JSON nesting) skips that file with its reason; the others are prepared.
    KeyboardInterrupt and SystemExit are not Exceptions and still stop the run.
    """
    path = Path(job.path)
    try:
        if job.dataset == "kinetics":
            arr, label = read_kinetics(path, max_people=BODIES, num_classes=KINETICS_CLASSES)
            if not (arr[..., 2] > 0).any():     # the release's has_skeleton=false clips; ST-GCN drops them too
                raise InputError(f"{path}: no person detected in any frame")
            return [("ok", path.stem, int(label), _checked(image_pipeline(frames, BODIES)(arr), path), job.path)]
        if job.dataset == "pku":
            # per labelled segment, so one bad label line costs that segment only (frames as in read_pku_segments)
            skeleton = read_pku_skeleton(path)                                     # (M, T, V, C)
            out: list[Result] = []
            for k, label in enumerate(read_pku_labels(job.labels), start=1):
                name = f"{path.stem}_{k:03d}"
                try:
                    if label.start < 0 or label.end >= skeleton.shape[1]:
                        raise InputError(f"frames {label.start}..{label.end} fall outside the sequence "
                                         f"(frames 0..{skeleton.shape[1] - 1})")
                    if label.action > PKU_CLASSES:
                        raise InputError(f"action {label.action}: expected 1..{PKU_CLASSES}")
                    segment = skeleton[:, label.start:label.end + 1]
                    out.append(("ok", name, label.action - 1, _checked(ntu_pipeline(frames, BODIES)(segment), path),
                                job.path))
                except Exception as err:  # noqa: BLE001 - one bad segment costs that segment only
                    out.append(("skip", name, job.path, f"{job.labels} segment {k}: {_reason(err)}"))
            return out
        sample = parse_sample_name(path.name.split(".")[0], source=path)
        arr = to_array(read_skeleton(path), max_bodies=BODIES)
        return [("ok", path.name.split(".")[0], sample.label0, _checked(ntu_pipeline(frames, BODIES)(arr), path),
                 job.path)]
    except Exception as err:  # noqa: BLE001 - see the docstring: one hostile file never aborts the run
        return [("skip", path.name.split(".")[0], job.path, _reason(err, path))]


RAW_SUFFIXES = {".skeleton": "ntu", ".json": "kinetics", ".txt": "pku"}


def read_unlabelled(path: Path, frames: int) -> np.ndarray:
    """One raw file of any name, whole, through the same reader and preprocessing as `prepare`: (M, frames, V, C).

    The family comes from the suffix (.skeleton NTU RGB+D, .json Kinetics-skeleton, .txt a PKU-MMD sequence);
    the file's own label is not used (a Kinetics clip still needs the release's label_index field)."""
    path = Path(path)
    family = RAW_SUFFIXES.get(path.suffix.lower())
    if family is None:
        raise InputError(f"{path}: expected a .skeleton (NTU), .json (Kinetics-skeleton) or .txt (PKU-MMD) file")
    if family == "kinetics":
        arr, _ = read_kinetics(path, max_people=BODIES)
        if not (arr[..., 2] > 0).any():
            raise InputError(f"{path}: no person detected in any frame")
        return _checked(image_pipeline(frames, BODIES)(arr), path)
    arr = read_pku_skeleton(path) if family == "pku" else to_array(read_skeleton(path), max_bodies=BODIES)
    return _checked(ntu_pipeline(frames, BODIES)(arr), path)


def _reason(err: Exception, path: Path | None = None) -> str:
    """One line for skipped.tsv: an InputError names the file itself; anything else gets its type and the file."""
    if isinstance(err, InputError):
        return _one_line(str(err))
    where = f"{path}: " if path is not None else ""
    return _one_line(f"{where}{type(err).__name__}: {str(err)[:200]}")


def _checked(sample: np.ndarray, path: Path) -> np.ndarray:
    """A preprocessed sample, refused when it holds NaN, inf or absurd values (never written into data.npy)."""
    with np.errstate(invalid="ignore"):
        bad = not np.isfinite(sample).all() or np.abs(sample).max(initial=0.0) > MAX_ABS_INPUT
    if bad:
        raise InputError(f"{path}: preprocessing gave non-finite or absurd values (|x| > {MAX_ABS_INPUT:g})")
    return sample


def process_chunk(jobs: list[Job], frames: int) -> list[Result]:
    return [r for job in jobs for r in process_job(job, frames)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# Finding inputs
# ----------------------------------------------------------------------------------------------

def find_jobs(dataset: str, raw: Path, labels: Path | None, missing: Path | None,
              log) -> tuple[list[Job], list[tuple[str, str, str]]]:
    """(jobs sorted by file name, pre-parse skips (name, path, reason)); missing-list samples are dropped."""
    if not raw.is_dir():
        raise InputError(f"--raw {raw}: not a folder")
    skips: list[tuple[str, str, str]] = []
    if dataset == "kinetics":
        # a release: only the clips under kinetics_train/ and kinetics_val/ (not kinetics_*_label.json beside
        # them); any other folder: every .json in it
        split_dirs = [d for d in KINETICS_FOLDERS if (raw / d).is_dir()]
        found = [f for d in split_dirs for f in (raw / d).rglob("*.json")] if split_dirs else raw.rglob("*.json")
        files = sorted(found, key=lambda p: (p.name, str(p)))
    elif dataset == "pku":
        files = sorted(raw.rglob("*.txt"), key=lambda p: (p.name, str(p)))
    else:
        files = sorted(raw.rglob("*.skeleton"), key=lambda p: (p.name, str(p)))
    if not files:
        suffix = {"kinetics": ".json", "pku": ".txt"}.get(dataset, ".skeleton")
        raise InputError(f"--raw {raw}: no {suffix} files found")

    exclude: set[str] = set()
    if missing is not None:
        exclude = load_missing_list(missing) if dataset != "pku" else _read_name_list(missing)

    jobs: list[Job] = []
    seen: dict[str, Path] = {}
    outside = dropped = 0
    for path in files:
        name = path.name.split(".")[0]
        if name in seen:
            skips.append((name, str(path), f"{path}: duplicate of {seen[name]}"))
            continue
        seen[name] = path
        if name in exclude:
            dropped += 1
            continue
        if dataset in NTU_LIMITS:
            try:
                sample = parse_sample_name(name, source=path)
            except InputError as err:
                skips.append((name, str(path), str(err)))
                continue
            actions, setups = NTU_LIMITS[dataset]
            if sample.action > actions or sample.setup > setups:
                outside += 1
                continue
        if dataset == "pku":
            label_file = labels / path.name
            if not label_file.is_file():
                skips.append((name, str(path), f"{path}: no label file {label_file}"))
                continue
            jobs.append(Job(dataset, str(path), str(label_file)))
        else:
            jobs.append(Job(dataset, str(path)))
    if dropped:
        log(f"dropped {dropped} samples listed in {missing}")
    if outside:
        limits = NTU_LIMITS[dataset]
        log(f"ignored {outside} files outside {dataset} (actions 1..{limits[0]}, setups 1..{limits[1]})")
    return jobs, skips


def _read_name_list(path: Path) -> set[str]:
    """PKU-MMD missing-skeleton lists: one sequence name a line."""
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except OSError as err:
        raise InputError(f"--missing {path}: cannot read ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------

def chunked(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def shard_key(chunk: list[Job], frames: int) -> str:
    """Names a chunk's shard: its files (with sizes and mtimes) and everything that changes the arrays."""
    return stable_hash({"v": PIPELINE_VERSION, "frames": frames, "bodies": BODIES,
                        "jobs": [[j.dataset, j.fingerprint()] for j in chunk]})[:24]


def save_shard(path: Path, results: list[Result], frames: int, joints: int) -> None:
    ok = [r for r in results if r[0] == "ok"]
    skip = [r for r in results if r[0] == "skip"]
    data = np.stack([r[3] for r in ok]) if ok else np.zeros((0, BODIES, frames, joints, 3), np.float32)
    arrays = {"data": data.astype(np.float32), "names": np.array([r[1] for r in ok], dtype=str),
              "labels": np.array([r[2] for r in ok], dtype=np.int64),
              "sources": np.array([r[4] for r in ok], dtype=str),
              "skip_names": np.array([r[1] for r in skip], dtype=str),
              "skip_paths": np.array([r[2] for r in skip], dtype=str),
              "skip_reasons": np.array([r[3] for r in skip], dtype=str)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:                 # a file object: np.savez would append .npz to the temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


SHARD_KEYS = {"data", "names", "labels", "sources", "skip_names", "skip_paths", "skip_reasons"}


def shard_ok(path: Path, log) -> bool:
    """Whether a cached shard is whole (every member present, every CRC right); a truncated or corrupt one
    (a crash mid-copy, a full disk) is deleted so its chunk is parsed again instead of failing every re-run."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is None and {n.removesuffix(".npy") for n in z.namelist()} == SHARD_KEYS:
                return True
        reason = "bad CRC or members"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        reason = type(err).__name__
    log(f"discarding corrupt shard {path.name} ({reason}): its files are parsed again")
    path.unlink(missing_ok=True)
    return False


def load_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker gets SIGKILL when its parent dies, however it dies (a SIGKILLed prepare
    cannot shut its pool down, and orphaned workers would keep parsing and holding memory)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:           # the parent died before prctl took effect
        os._exit(1)


def run_chunks(chunks: list[list[Job]], frames: int, workers: int, on_done) -> None:
    """process_chunk over every chunk (in-process for workers=1); on_done(index, results) as each finishes."""
    if workers <= 1:
        for i, chunk in enumerate(chunks):
            on_done(i, process_chunk(chunk, frames))
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(process_chunk, chunk, frames): i for i, chunk in enumerate(chunks)}
        for fut in as_completed(futures):
            on_done(futures[fut], fut.result())
    except BaseException:                          # Ctrl-C or a bug: do not wait for the queued chunks
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


# ----------------------------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------------------------

def split_columns(name: str, benchmarks: list[str]) -> list[str]:
    """NTU-named samples: 'train' / 'test' per benchmark, '-' outside its actions or setups."""
    sample = parse_sample_name(name)
    out = []
    for b in benchmarks:
        bench = BENCHMARKS[b]
        inside = sample.action <= bench.num_classes and sample.setup <= bench.num_setups
        out.append(("train" if bench.is_train(sample) else "test") if inside else "-")
    return out


def job_columns(dataset: str, jobs: list[Job], raw: Path, benchmarks: list[str],
                lists: dict[str, dict[str, str]], log) -> dict[str, list[str]]:
    """{job path: one 'train' / 'test' / '-' per benchmark}; every sample of a job (a PKU sequence's segments)
    shares its job's columns. Counts the inputs that no split places."""
    out: dict[str, list[str]] = {}
    for job in jobs:
        path = Path(job.path)
        if FAMILY[dataset] == "ntu":
            out[job.path] = split_columns(path.name.split(".")[0], benchmarks)
        elif dataset == "kinetics":
            try:
                out[job.path] = [kinetics_split(path, raw)] * len(benchmarks)
            except InputError:
                out[job.path] = ["-"] * len(benchmarks)
        else:
            out[job.path] = [lists[b].get(path.stem, "-") for b in benchmarks]
    for k, b in enumerate(benchmarks):
        outside = sum(cols[k] == "-" for cols in out.values())
        if outside and FAMILY[dataset] != "ntu":
            where = ("under kinetics_train/ or kinetics_val/" if dataset == "kinetics"
                     else "in its --split-list file")
            log(f"{outside} of {len(jobs)} inputs are not {where}: '-' in the {b} column")
    return out


def index_rows(dataset: str, names: Iterable[str], labels: Iterable[int], benchmarks: list[str],
               columns: Iterable[list[str]]) -> list[str]:
    rows = ["\t".join(INDEX_FIELDS + benchmarks)]
    for name, label, cols in zip(names, labels, columns):
        if FAMILY[dataset] == "ntu":
            s = parse_sample_name(name)
            fields = [name, str(label), str(s.setup), str(s.camera), str(s.performer), str(s.replication)]
        else:
            fields = [name, str(label), "", "", "", ""]
        rows.append("\t".join(fields + list(cols)))
    return rows


def parse_split_lists(items: list[str] | None, dataset: str) -> dict[str, Path]:
    """--split-list BENCH=FILE ... -> {benchmark: file}; only list-split benchmarks of the dataset's family."""
    out: dict[str, Path] = {}
    for item in items or []:
        bench, eq, file = item.partition("=")
        if not eq or not file:
            raise InputError(f"--split-list {item}: expected BENCHMARK=FILE, e.g. pku-xsub=Split/cross-subject.txt")
        b = get_benchmark(bench)
        if bench in out:
            raise InputError(f"--split-list {item}: {bench} already given ({bench}={out[bench]})")
        if b.split_from != "list" or b.family != FAMILY[dataset]:
            listed = [n for n, x in BENCHMARKS.items() if x.split_from == "list" and x.family == FAMILY[dataset]]
            raise InputError(f"--split-list {item}: {dataset} takes lists for {', '.join(listed) or 'no benchmark'}")
        out[bench] = Path(file)
    return out


def prepare(dataset: str, raw: Path, out: Path, frames: int = 64, workers: int = 1,
            benchmarks: list[str] | None = None, missing: Path | None = None, labels: Path | None = None,
            split_lists: dict[str, Path] | None = None, dtype: str = "float32", chunk_size: int = 32,
            keep_parts: bool = False, progress: bool = True, log=None) -> dict:
    """Prepare `raw` into `out` (see the module docstring); returns the summary also stored in prepare.json."""
    log = log or (lambda msg: print(f"prepare: {msg}", file=sys.stderr))
    start = time.perf_counter()
    if dataset not in DATASETS:
        raise InputError(f"dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if frames < 1:
        raise InputError(f"--frames {frames}: expected at least 1")
    if chunk_size < 1:
        raise InputError(f"--chunk-size {chunk_size}: expected at least 1")
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype {dtype}: expected float32 or float16")
    split_lists = dict(split_lists or {})
    for b in split_lists:
        if get_benchmark(b).split_from != "list" or get_benchmark(b).family != FAMILY[dataset]:
            raise InputError(f"--split-list {b}: {dataset} has no benchmark split by an official list file")
    if benchmarks is None:
        benchmarks = list(split_lists) if dataset == "pku" else DEFAULT_BENCHMARKS[dataset]
    benchmarks = list(benchmarks)
    for b in benchmarks:
        bench = get_benchmark(b)
        if bench.family != FAMILY[dataset]:
            fits = [n for n, x in BENCHMARKS.items() if x.family == FAMILY[dataset]]
            raise InputError(f"--benchmark {b}: not a {dataset} benchmark (expected one of {', '.join(fits)})")
        if bench.split_from == "list" and b not in split_lists:
            raise InputError(f"--benchmark {b}: needs its official list, --split-list {b}=FILE")
    if dataset == "pku" and not benchmarks:
        log("no --split-list given: index.tsv gets no train/test column (pku-xsub / pku-xview need the "
            "release's Split/cross-subject.txt and cross-view.txt)")
    lists = {b: read_split_list(split_lists[b]) for b in benchmarks if b in split_lists}
    if dataset == "pku" and (labels is None or not labels.is_dir()):
        raise InputError(f"--labels {labels or ''}: pku needs the folder of PKU-MMD label files (same names as "
                         "the skeleton files)")
    if missing is not None and not missing.is_file():
        raise InputError(f"--missing {missing}: file not found")

    jobs, pre_skips = find_jobs(dataset, raw, labels, missing, log)
    columns = job_columns(dataset, jobs, raw, benchmarks, lists, log)     # into the stamp: it comes from --raw too
    joints = 18 if dataset == "kinetics" else 25
    stamp = stable_hash({"v": PIPELINE_VERSION, "dataset": dataset, "frames": frames, "dtype": dtype,
                         "benchmarks": benchmarks, "jobs": [j.fingerprint() for j in jobs],
                         "columns": [columns[j.path] for j in jobs],
                         "pre_skips": pre_skips,
                         "missing": missing.read_text() if missing is not None else None})
    meta_path = out / "prepare.json"
    outputs = [out / n for n in ("data.npy", "label.npy", "index.tsv", "skipped.tsv")]
    if meta_path.is_file() and all(p.is_file() for p in outputs):
        try:
            previous = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("stamp") == stamp:
            problem = content_problem(out, previous.get("files"))    # a truncated or overwritten data.npy
            if problem is None:
                log(f"up to date: {out} ({previous.get('samples')} samples; inputs and options unchanged)")
                return {**previous, "up_to_date": True}
            log(f"re-preparing {out}: {problem}")

    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    chunks = chunked(jobs, chunk_size)
    shard_paths = [parts / f"{shard_key(c, frames)}.npz" for c in chunks]
    todo = [i for i, p in enumerate(shard_paths) if not shard_ok(p, log)]
    workers = max(1, min(workers, len(todo)))
    log(f"{len(jobs)} files in {len(chunks)} chunks: {len(chunks) - len(todo)} cached, {len(todo)} to parse "
        f"with {workers} worker{'s' if workers != 1 else ''}")

    bar = tqdm(total=sum(len(chunks[i]) for i in todo), desc=f"prepare {dataset}", unit="file",
               file=sys.stderr, disable=not progress)

    def on_done(k: int, results: list[Result]) -> None:
        i = todo[k]
        for r in results:
            if r[0] == "skip":
                bar.write(f"skipped: {r[3]}", file=sys.stderr)
        save_shard(shard_paths[i], results, frames, joints)
        bar.update(len(chunks[i]))

    try:
        run_chunks([chunks[i] for i in todo], frames, workers, on_done)
    finally:
        bar.close()
    for _name, _path, reason in pre_skips:
        log(f"skipped: {reason}")

    summary = assemble(dataset, out, shard_paths, pre_skips, benchmarks, columns, frames, joints, dtype)
    summary.update(dataset=dataset, raw=str(raw), frames=frames, dtype=dtype, benchmarks=benchmarks,
                   layout="N, C, T, V, M", stamp=stamp, seconds=round(time.perf_counter() - start, 3))
    summary["files"] = content_record(out)     # size + sha256: "up to date" and every load check the content
    atomic_write_text(meta_path, json.dumps(summary, indent=1) + "\n")         # last: marks the output complete
    keep = {p.name for p in shard_paths}
    if keep_parts:
        for stale in parts.glob("*.npz"):
            if stale.name not in keep:
                stale.unlink()
    else:
        shutil.rmtree(parts, ignore_errors=True)
    log(f"wrote {summary['samples']} samples to {out / 'data.npy'} {tuple(summary['shape'])} {dtype}; "
        f"{summary['skipped']} skipped")
    return summary


def assemble(dataset: str, out: Path, shard_paths: list[Path], pre_skips: list[tuple[str, str, str]],
             benchmarks: list[str], columns: dict[str, list[str]], frames: int, joints: int, dtype: str) -> dict:
    """Stream the shards into data.npy (N, C, T, V, M), label.npy, index.tsv and skipped.tsv."""
    counts, names, labels, sources, skips = [], [], [], [], list(pre_skips)
    for path in shard_paths:                       # pass 1: the small arrays only
        with np.load(path, allow_pickle=False) as z:
            counts.append(int(z["labels"].shape[0]))
            names += z["names"].tolist()
            labels += z["labels"].tolist()
            sources += z["sources"].tolist()
            skips += list(zip(z["skip_names"].tolist(), z["skip_paths"].tolist(), z["skip_reasons"].tolist()))
    skipped = ["name\tpath\treason"] + [f"{n}\t{p}\t{_one_line(r)}" for n, p, r in skips]
    atomic_write_text(out / "skipped.tsv", "\n".join(skipped) + "\n")
    total = sum(counts)
    if total == 0:
        raise InputError(f"no usable samples: all {len(skips)} inputs were skipped (listed in {out / 'skipped.tsv'})")
    shape = (total, 3, frames, joints, BODIES)

    def write_data(tmp: Path) -> None:             # pass 2: one shard at a time into a memory map
        data = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        row = 0
        for path, n in zip(shard_paths, counts):
            if n:
                chunk = load_shard(path)["data"]                                 # (n, M, T, V, C)
                data[row:row + n] = chunk.transpose(0, 4, 2, 3, 1)               # (n, C, T, V, M)
                row += n
        data.flush()
        del data

    def write_labels(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(labels, dtype=np.int64))

    atomic_write(out / "data.npy", write_data)
    atomic_write(out / "label.npy", write_labels)
    rows = index_rows(dataset, names, labels, benchmarks, (columns[src] for src in sources))
    atomic_write_text(out / "index.tsv", "\n".join(rows) + "\n")
    return {"samples": total, "skipped": len(skips), "shape": list(shape),
            "classes_seen": len(set(labels))}


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

