"""Named data sources: small demo sets shipped with the package and full datasets fetched on demand.

A *source* is what users type instead of a path: ``counterfact-demo``, ``zsre-demo`` and
``mquake-demo`` are JSON files inside this package (``datamodules/demo/``); ``counterfact``,
``zsre`` and ``mquake`` are the full public datasets, downloaded on first use into the user's
cache directory (``$FACTEDIT_CACHE/data``, by default ``~/.cache/factedit/data``) and verified by
SHA-256, or by the Git blob id of a file served from a Git repository, where one is known.

Nothing here touches the network or the disk at import time; :func:`resolve_source` is the one
entry point, called by :func:`factedit.datamodules.records.load_requests` and by the datamodules'
``prepare_data``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from factedit.files import cache_root

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class SourceError(RuntimeError):
    """A named source cannot be found, downloaded or verified."""


@dataclass(frozen=True)
class Source:
    """A dataset known by name.

    ``filename`` is relative to the package's ``demo/`` folder for bundled sources and to the
    cache directory for downloaded ones. ``sha256`` and ``size`` verify a download; ``None``
    means the value is not known (the digest is then logged so that it can be recorded).
    ``git_blob`` verifies a file served raw from a Git repository by the id its tree lists for
    it (SHA-1 of ``b"blob <size>\0"`` + the bytes): a repository publishes that for every file,
    where it publishes no SHA-256.
    """

    name: str
    format: str
    filename: str
    description: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    git_blob: str | None = None

    @property
    def bundled(self) -> bool:
        return self.url is None


# Read-only table of the known sources (immutable, so it holds no state).
SOURCES: Mapping[str, Source] = MappingProxyType(
    {
        "counterfact-demo": Source(
            name="counterfact-demo",
            format="counterfact",
            filename="demo_counterfact.json",
            description="a few CounterFact records (ROME format) shipped with the package",
        ),
        "zsre-demo": Source(
            name="zsre-demo",
            format="zsre",
            filename="demo_zsre.json",
            description="a few zsRE records (MEND format) shipped with the package",
        ),
        "mquake-demo": Source(
            name="mquake-demo",
            format="mquake",
            filename="mquake_demo.json",
            description="a few hand-written two-hop MQuAKE-style cases (MQuAKE format) shipped with the package",
        ),
        "counterfact": Source(
            name="counterfact",
            format="counterfact",
            filename="counterfact.json",
            description="CounterFact (Meng et al., 2022), 21,919 records, ROME format",
            url="https://rome.baulab.info/data/dsets/counterfact.json",
            sha256="d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
            size=45_108_470,
        ),
        "zsre": Source(
            name="zsre",
            format="zsre",
            filename="zsre_mem-eval.json",
            description="zsRE question answering edits, MEND evaluation split",
            url="https://rome.baulab.info/data/dsets/zsre_mem-eval.json",
            # No checksum of this file is published, and no copy of the original is at hand (the
            # zsRE files of ../shared/data are other splits, re-serialised). With no checksum the
            # first download's SHA-256 is logged and pinned beside it (see ensure_downloaded), so a
            # cached copy that changes afterwards is detected; fill the digest in here once known.
            sha256=None,
        ),
        "mquake": Source(
            name="mquake",
            format="mquake",
            filename="MQuAKE-CF-3k.json",
            description="MQuAKE-CF-3k (Zhong et al., 2023), 3,000 multi-hop cases of 1-4 edits each, MQuAKE format",
            url="https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/MQuAKE-CF-3k.json",
            # No SHA-256 of this file is published (the repository has no release or Git-LFS
            # pointer for it); its tree lists the blob id, unchanged since commit a4f38bb
            # (2023-06-08) and still the one at main's fb43dad (2024-09-12).
            sha256=None,
            git_blob="b9d0963c6c1c81b24d8113ffdc3fd0865a423e18",
        ),
    }
)


def known_sources() -> list[str]:
    """The names accepted wherever a data path is expected."""
    return sorted(SOURCES)


def cache_dir() -> Path:
    """Where downloaded datasets live: ``$FACTEDIT_CACHE/data``, else ``~/.cache/factedit/data``.

    ``$FACTEDIT_CACHE`` is the project's cache root (models are cached beside the data);
    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when it is set.
    """
    return cache_root() / "data"


def bundled_dir() -> Path:
    """The folder of the demo sets shipped inside the package."""
    return Path(__file__).resolve().parent / "demo"


def source_path(source: Source, directory: Path | None = None) -> Path:
    """Where ``source``'s file lives (or will live once downloaded)."""
    if source.bundled:
        return bundled_dir() / source.filename
    return (directory if directory is not None else cache_dir()) / source.filename


def resolve_source(source: str | os.PathLike[str], download: bool = True) -> tuple[Path, str | None]:
    """Turn a path or a source name into an existing file and, for names, its format.

    Existing paths win over names (a local file called ``zsre`` is read as that file). For a
    downloadable name the file is fetched when missing if ``download`` is true; otherwise a
    missing file is an error saying how to get it.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, None
    name = str(source)
    if name in SOURCES:
        entry = SOURCES[name]
        if entry.bundled:
            target = source_path(entry)
            if not target.is_file():
                raise SourceError(f"the bundled data set {name!r} is missing from the installed package (expected {target})")
            return target, entry.format
        return ensure_downloaded(entry, download=download), entry.format
    if path.exists():
        raise SourceError(f"{path} is not a file; pass a JSON or JSONL file of edit records")
    raise SourceError(f"{str(source)!r} is neither an existing file nor a known data set; known names: {', '.join(known_sources())}")


def ensure_downloaded(source: Source, download: bool = True, directory: Path | None = None) -> Path:
    """Return the local copy of a downloadable ``source``, fetching and verifying it if needed.

    A cached file whose checksum does not match is fetched again. A source with neither a SHA-256
    nor a Git blob id is pinned on first use: the digest of its first download is written beside
    it (``<file>.sha256``) and later uses check the cached copy against that.
    """
    if source.url is None:
        raise SourceError(f"{source.name!r} is bundled with the package; there is nothing to download")
    dest = source_path(source, directory)
    pin = dest.with_name(dest.name + ".sha256")
    expected = source.sha256
    if expected is None and source.git_blob is None and pin.is_file():
        expected = pin.read_text().strip() or None
    if dest.is_file():
        if (expected is None or sha256_of(dest) == expected) and (source.git_blob is None or git_blob_of(dest) == source.git_blob):
            return dest
        logger.warning("%s: checksum does not match the expected %s; downloading %s again", dest, expected or source.git_blob, source.name)
    if not download:
        raise SourceError(
            f"data set {source.name!r} is not downloaded yet (expected at {dest}); call prepare_data() "
            f"or load it once with downloads allowed, or pass a local path instead"
        )
    path = download_file(source.url, dest, sha256=source.sha256, size=source.size, name=source.name, git_blob=source.git_blob)
    if source.sha256 is None and source.git_blob is None:
        digest = sha256_of(path)
        if expected is not None and digest != expected:
            logger.warning("%s: the download's SHA-256 %s differs from the one pinned at first download (%s): the served file changed", source.name, digest, expected)
        pin.write_text(digest + "\n")
    return path


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_of(path: Path) -> str:
    """The id Git gives a file's content: SHA-1 of ``b"blob <size>\0"`` followed by the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    sha256: str | None = None,
    size: int | None = None,
    name: str | None = None,
    timeout: float = 60.0,
    git_blob: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its size, SHA-256 and Git blob id when given.

    The bytes go to a temporary file in ``dest``'s folder, which is renamed onto ``dest`` only
    once it is complete and verified; on any failure the temporary file is removed, so ``dest``
    is either absent, unchanged, or the verified file.
    """
    label = name or url
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from %s to %s", label, url, dest)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                total = size or _content_length(response)
                progress = _progress_bar(total, label)
                try:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
                finally:
                    progress.close()
        except (urllib.error.URLError, OSError) as err:
            raise SourceError(
                f"could not download {label} from {url} ({err}). If this machine is offline, download the file "
                f"elsewhere and pass its local path instead (or copy it to {dest})"
            ) from err
        if size is not None and received != size:
            raise SourceError(f"download of {label} from {url} is incomplete or wrong: {received:,} bytes, expected {size:,}")
        actual = digest.hexdigest()
        blob = git_blob_of(tmp) if git_blob is not None else None
        if blob != git_blob:
            raise SourceError(f"download of {label} from {url} failed verification: git blob id {blob}, expected {git_blob}")
        if sha256 is None and git_blob is None:
            logger.warning("%s: no checksum is recorded for %s; keeping the file, sha256=%s (%d bytes)", dest, label, actual, received)
        elif sha256 is not None and actual != sha256:
            raise SourceError(f"download of {label} from {url} failed verification: sha256 {actual}, expected {sha256}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("saved %s (%d bytes) to %s", label, received, dest)
    return dest


def _content_length(response: object) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value and value.isdigit() else None


def _progress_bar(total: int | None, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}", disable=None, leave=False)
