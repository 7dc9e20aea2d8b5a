"""The data step: names.txt obtained, verified, never clobbered; the lecture's figures."""

import subprocess
import sys

import pytest

from backprop_ninja import data

CLI = [sys.executable, "-m", "backprop_ninja.cli"]


def run_cli(*args, env_data_dir, extra_env=None):
    import os

    env = {**os.environ, "BACKPROP_NINJA_DATA": str(env_data_dir), **(extra_env or {})}
    env.pop("BACKPROP_NINJA_NAMES", None)
    env.update(extra_env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


def test_lecture_figures_on_canonical_data(canonical_words):
    words = canonical_words
    assert len(words) == 32033
    assert max(len(w) for w in words) == 15
    assert words[:8] == "emma olivia ava isabella sophia charlotte mia amelia".split()
    stoi, itos = data.vocabulary(words)
    assert len(stoi) == 27 and itos[0] == "." and stoi["a"] == 1 and stoi["z"] == 26
    (Xtr, Ytr), (Xdev, Ydev), (Xte, Yte) = data.lecture_splits(words)
    assert (Xtr.shape, Ytr.shape) == ((182625, 3), (182625,))
    assert (Xdev.shape, Ydev.shape) == ((22655, 3), (22655,))
    assert (Xte.shape, Yte.shape) == ((22866, 3), (22866,))


def test_split_does_not_mutate_and_is_deterministic(words):
    before = list(words)
    a = data.lecture_splits(words)
    b = data.lecture_splits(words)
    assert words == before
    assert all((x == y).all() for (xa, ya), (xb, yb) in zip(a, b) for x, y in ((xa, xb), (ya, yb)))


def test_build_dataset_contexts():
    stoi, _ = data.vocabulary(["emma"])
    X, Y = data.build_dataset(["emma"], stoi, block_size=3)
    e, m, a = stoi["e"], stoi["m"], stoi["a"]
    assert X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert Y.tolist() == [e, m, m, a, 0]


@pytest.fixture
def canonical_copy(tmp_path):
    if not data.is_canonical():
        pytest.skip("needs the canonical names.txt to copy from")
    return data.names_path()


def test_from_copies_and_verifies(tmp_path, canonical_copy):
    r = run_cli("data", "--from", str(canonical_copy), env_data_dir=tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert data.is_canonical(tmp_path / "d" / "names.txt")


def test_truncated_from_is_refused_and_good_file_untouched(tmp_path, canonical_copy):
    dest_dir = tmp_path / "d"
    dest_dir.mkdir()
    good = canonical_copy.read_bytes()
    (dest_dir / "names.txt").write_bytes(good)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(good[:1000])
    r = run_cli("data", "--from", str(truncated), env_data_dir=dest_dir)
    assert r.returncode != 0
    assert "not the course's names.txt" in r.stderr and "--from" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (dest_dir / "names.txt").read_bytes() == good


def test_truncated_from_into_empty_dir_writes_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("emma\nolivia\n")
    r = run_cli("data", "--from", str(bad), env_data_dir=tmp_path / "d")
    assert r.returncode != 0 and "truncated" in r.stderr
    assert not (tmp_path / "d" / "names.txt").exists()


def test_missing_from_path_is_one_sentence(tmp_path):
    r = run_cli("data", "--from", str(tmp_path / "nope.txt"), env_data_dir=tmp_path / "d")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_existing_file_is_refused_not_overwritten(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "names.txt").write_text("not names")
    r = run_cli("data", "--no-download", env_data_dir=d)
    assert r.returncode != 0 and "delete it" in r.stderr
    assert (d / "names.txt").read_text() == "not names"


def test_offline_fallback_is_loud_and_usable(tmp_path):
    d = tmp_path / "d"
    r = run_cli("data", "--no-download", env_data_dir=d,
                extra_env={"BACKPROP_NINJA_NAMES": str(tmp_path / "absent.txt")})
    assert r.returncode == 0, r.stderr
    assert "OFFLINE FALLBACK" in r.stdout
    words = data.load_words(d / "names.txt")
    assert len(words) > 30000 and words[:3] == ["emma", "olivia", "ava"]
    assert all(w.isalpha() and w.islower() for w in words)
    assert not data.is_canonical(d / "names.txt")
    # a second run keeps it, and says so
    r2 = run_cli("data", "--no-download", env_data_dir=d)
    assert r2.returncode == 0 and "FALLBACK" in r2.stdout


def test_fallback_replaced_by_canonical_when_offered(tmp_path, canonical_copy):
    d = tmp_path / "d"
    d.mkdir()
    (d / "names.txt").write_text("emma\nolivia")
    (d / "names.fallback").write_text("x")
    r = run_cli("data", "--from", str(canonical_copy), env_data_dir=d)
    assert r.returncode == 0, r.stderr
    assert data.is_canonical(d / "names.txt") and not (d / "names.fallback").exists()
