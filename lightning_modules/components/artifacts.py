"""Atomic artifact writes and stage completion markers of the run directory.

A stage folder is complete only when its ``stage.json`` exists and every artifact it lists
(path, size, sha256) is still there unchanged; it is written last and atomically (temp file +
rename), so a killed run never leaves a stage that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STAGE_MARKER = "stage.json"
# The sasrec stage's user states, per split whose target they precede: "valid" after the
# training items, "test" after the validation item too, "predict" after every known item.
USER_EMBEDDING_FILES = {"valid": "user_embeddings.pt", "test": "user_embeddings_test.pt",
                        "predict": "user_embeddings_predict.pt"}
# The sasrec stage's user state before every training target (the state after each proper
# prefix of the training items), and the tokenizer's user codes of those states: the user SCID
# a training prompt can show without encoding the items it trains on (SFT
# ``user_scid_causal``). Both files hold ``{"<states|codes>": [P, ...], "offsets": [U + 1]}``:
# user ``u``'s prefix of length ``p`` (1 <= p < its number of training items) is row
# ``offsets[u] + p - 1``.
USER_PREFIX_EMBEDDING_FILE = "user_prefix_embeddings.pt"
USER_PREFIX_CODES_FILE = "user_prefix_codes.pt"


class ArtifactError(ValueError):
    """An artifact of a run that cannot be read: names the file, what was expected and the
    stage that writes it (re-running that stage replaces it)."""

    def __init__(self, path: str | os.PathLike, expected: str, stage: str | None,
                 cause: BaseException | str | None = None) -> None:
        detail = f" ({_short(f'{type(cause).__name__}: {cause}')})" \
            if isinstance(cause, BaseException) else (f" ({_short(str(cause))})" if cause else "")
        advice = (f"; re-run the '{stage}' stage (python cli.py pipeline --config ... "
                  f"--stages {stage} --force)" if stage else "")
        super().__init__(f"{path}: cannot read {expected}{detail}{advice}")
        self.path, self.stage = Path(path), stage


def _short(text: str, limit: int = 300) -> str:
    # Library messages can run to many lines (torch's unpickling advice among them): one line.
    first = " ".join(text.split())
    return first if len(first) <= limit else first[:limit] + "..."


def load_tensor(path: str | os.PathLike, stage: str, expected: str = "a tensor file"):
    """``torch.load(path, weights_only=True)``, any failure an :class:`ArtifactError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torn writes raise anything from OSError on
        raise ArtifactError(path, expected, stage, err) from err


def check_checkpoint(path: str | os.PathLike, stage: str | None = None) -> None:
    """Fail early, with the file named, on a checkpoint that does not load safely (truncated,
    not a checkpoint, or holding objects that only ``weights_only=False`` would unpickle,
    which this framework never does for you)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(path, "a Lightning checkpoint of this framework", stage,
                            "truncated, not a checkpoint, or holding objects outside torch's "
                            f"safe set: {type(err).__name__}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ArtifactError(path, "a Lightning checkpoint of this framework", stage,
                            "no state_dict in it")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def atomic_save_npy(path: str | os.PathLike, array) -> Path:
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, np.asarray(array))
    os.replace(tmp, path)
    return path


def write_ranks(run_dir: str | os.PathLike, stage: str, last_ranks: dict, user_ids) -> list[str]:
    """Per-user target ranks of a stage's latest valid/test evaluation:
    ``<stage>/ranks_<split>.npy`` (int64, one per evaluated user, ordered by split row) and
    ``<stage>/ranks_users.json`` (the users' raw ids per split, the same order, and the value
    that means "the ranking never reached the target"). ``user_ids[row]`` is a row's raw id.
    Returns the written file names."""
    from lightning_modules.components.metrics import NOT_RANKED

    out, users = [], {}
    for split in ("valid", "test"):
        got = last_ranks.get(split)
        if got is None:
            continue
        rows, ranks = got
        atomic_save_npy(stage_dir(run_dir, stage) / f"ranks_{split}.npy", ranks.numpy())
        users[split] = [str(user_ids[int(r)]) for r in rows.tolist()]
        out.append(f"ranks_{split}.npy")
    if users:
        atomic_write_json(stage_dir(run_dir, stage) / "ranks_users.json",
                          {"not_reached": NOT_RANKED, **users})
        out.append("ranks_users.json")
    return out


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(path, "JSON", _stage_of(path), err) from err


def _stage_of(path: Path) -> str | None:
    """The stage folder a run-directory file lies in (``<run>/<stage>/...``), if any."""
    return next((p.name for p in path.parents if p.name in KNOWN_STAGES), None)


KNOWN_STAGES = frozenset({"popular", "sasrec", "tokenizer", "sft", "dpo"})


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / stage


# Files of a stage folder that evaluations rewrite (reports, not artifacts of the stage).
REPORT_FILES = frozenset({STAGE_MARKER, "metrics.json"})


def _is_artifact(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts) and \
        rel.name not in REPORT_FILES and not rel.name.startswith("predictions")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_artifacts(folder: str | os.PathLike) -> list[dict]:
    """Every artifact file under a stage folder: ``{"path", "bytes", "sha256"}``, sorted."""
    folder = Path(folder)
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if _is_artifact(rel):
            out.append({"path": rel.as_posix(), "bytes": path.stat().st_size,
                        "sha256": file_sha256(path)})
    return out


def artifact_problems(folder: str | os.PathLike, record: dict, hashes: bool = True) -> list[str]:
    """What no longer matches the artifact list of a ``stage.json`` record: missing files,
    other sizes and (with ``hashes``) other contents. Empty when everything matches."""
    folder, problems = Path(folder), []
    for entry in record.get("artifacts") or []:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {entry['bytes']} recorded")
        elif hashes and file_sha256(path) != entry["sha256"]:
            problems.append(f"{path} changed since the stage finished (sha256 differs)")
    return problems


def stage_complete(run_dir: str | os.PathLike, stage: str, hashes: bool = False) -> bool:
    """``stage.json`` exists, is readable, and its artifacts are all there with their recorded
    sizes (and contents, with ``hashes``)."""
    marker = stage_dir(run_dir, stage) / STAGE_MARKER
    if not marker.exists():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and \
        not artifact_problems(marker.parent, record, hashes=hashes)


def read_stage(run_dir: str | os.PathLike, stage: str) -> dict:
    """The ``stage.json`` of a finished stage; a clear error naming the stage otherwise."""
    path = stage_dir(run_dir, stage) / STAGE_MARKER
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: the '{stage}' stage has not finished in {run_dir}; run it first "
            f"(python cli.py pipeline ... or "
            f"python cli.py fit --config configs/<dataset>/{stage}.yaml)")
    return read_json(path)


def mark_stage_complete(run_dir: str | os.PathLike, stage: str, info: dict) -> Path:
    """Write ``stage.json`` (``info`` plus the list of the folder's artifacts) last."""
    folder = stage_dir(run_dir, stage)
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(folder / STAGE_MARKER,
                             {**info, "artifacts": list_artifacts(folder)})


def upstream_digest(record: dict) -> str:
    """What a downstream stage's fingerprint takes from a finished stage: its fingerprint and
    the contents of the artifacts it exported. Checkpoints are left out: later stages read
    the exports, and a checkpoint also holds its own path and the trainer's loop state."""
    return fingerprint(record.get("stage_fingerprint"),
                       [(a["path"], a["sha256"]) for a in record.get("artifacts") or []
                        if not a["path"].startswith("checkpoints/")])


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts (config, dataset statistics, ...)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def find_stage(roots, stage: str, stage_fingerprint: str) -> Path | None:
    """A complete ``<stage>`` folder under any of ``roots`` whose ``stage.json`` records
    ``stage_fingerprint`` (see ``cli.stage_fingerprint``), or ``None``. Unreadable markers
    are passed over."""
    for root in roots or []:
        root = Path(root)
        if not root.is_dir():
            continue
        for marker in sorted(root.rglob(STAGE_MARKER)):
            if marker.parent.name != stage:
                continue
            try:
                record = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and \
                    record.get("stage_fingerprint") == stage_fingerprint and \
                    not artifact_problems(marker.parent, record, hashes=False):
                return marker.parent
    return None


@contextlib.contextmanager
def stage_lock(lock_dir: str | os.PathLike | None, stage: str, stage_fingerprint: str,
               on_wait=None):
    """Hold an exclusive lock on one stage fingerprint while it is found or computed, so that
    concurrent pipelines (``experiment --workers``) compute each equal stage once: the second
    waits for the first, then finds its result with :func:`find_stage`. ``None``: no lock.
    ``on_wait()`` is called once if the lock is held by another process. The lock is a
    ``flock`` on ``<lock_dir>/<stage>-<fingerprint>.lock``; the kernel drops it when its
    holder exits, so a killed worker never leaves a stage locked."""
    if lock_dir is None:
        yield
        return
    import fcntl

    path = Path(lock_dir) / f"{stage}-{stage_fingerprint}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def copy_stage(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a complete stage folder to ``dest`` (replacing what is there): the files first,
    through a temporary sibling renamed into place, then ``stage.json`` with ``reused_from``
    added, so that ``dest`` is complete only once everything is in it."""
    import shutil

    source, dest = Path(source), Path(dest)
    record = read_json(source / STAGE_MARKER)
    tmp = dest.with_name(f".{dest.name}.copy{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(STAGE_MARKER, ".*.tmp*"))
    problems = artifact_problems(tmp, record)
    if problems:
        shutil.rmtree(tmp)
        raise ValueError(f"{source}: cannot reuse this stage, its artifacts do not match its "
                         f"stage.json: {'; '.join(problems)}")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return atomic_write_json(dest / STAGE_MARKER, {**record, "reused_from": str(source)})
