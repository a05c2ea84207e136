"""Perceptual hashes find re-encoded and resized copies, and only those."""

import io

import numpy as np
import pytest
from conftest import synthetic_image
from PIL import Image

from xferlearn.data.images import DecodeCache, decode
from xferlearn.data.phash import MAX_DISTANCE, dhash, hashes, near_matches


def _bits(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def _photo(seed: int, size: int = 160) -> Image.Image:
    """A textured colour picture (smooth noise), unlike the synthetic X-rays."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _decoded(image: Image.Image, fmt: str = "JPEG", **save) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return decode(buffer.getvalue(), 64)


def test_reencoded_and_resized_copies_stay_close_and_others_do_not():
    for seed in range(5):
        original = _photo(seed)
        h = dhash(_decoded(original, quality=95))
        assert _bits(h, dhash(_decoded(original, "PNG"))) <= MAX_DISTANCE
        assert _bits(h, dhash(_decoded(original.resize((97, 97)), quality=60))) <= MAX_DISTANCE
        assert _bits(h, dhash(_decoded(_photo(seed + 100), quality=95))) > MAX_DISTANCE
    assert len(dhash(np.zeros((32, 32), np.uint8))) == 64  # 256 bits


def test_near_matches_and_hashes_through_the_cache(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpeg")
        synthetic_image(i % 2, i, size=64).save(paths[-1], quality=95)
    found = hashes(paths, [None] * 3, DecodeCache(tmp_path / "cache", 64))
    assert len(found) == 3 and all(len(h) == 64 for h in found)  # 256 bits
    flipped = f"{int(found[0], 16) ^ 0b111:064x}"  # 3 bits away: a near copy
    far = f"{int(found[0], 16) ^ (2**40 - 1):064x}"  # 40 bits away
    assert near_matches([flipped, far], [found[0]]).tolist() == [True, False]
    assert near_matches([], found).tolist() == [] and near_matches(found, []).tolist() == [False] * 3


def test_hashes_are_remembered_beside_the_cache_and_a_bad_memo_is_recomputed(tmp_path, monkeypatch):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        synthetic_image(i % 2, i, size=64).save(paths[-1])
    digests = [f"{i:040x}" for i in range(4)]
    cache = DecodeCache(tmp_path / "cache", 64)
    first = hashes(paths, digests, cache)
    memo = cache.root / "dhash256.json"
    assert memo.is_file()
    decoded = []
    original = DecodeCache.get
    monkeypatch.setattr(DecodeCache, "get", lambda self, *a: decoded.append(a) or original(self, *a))
    assert hashes(paths, digests, cache) == first and decoded == []  # read back, nothing decoded
    memo.write_text('{"' + digests[0] + '": "not a hash", "' + digests[1] + '": 7}')  # damaged entries
    assert hashes(paths, digests, cache) == first and len(decoded) == 4
    memo.write_text("{ not json")
    assert hashes(paths, digests, cache) == first


def test_scan_hashes_what_it_decodes_so_the_split_reads_nothing_back(tmp_path, monkeypatch):
    from conftest import make_folder

    from xferlearn.data.folders import scan

    cache = DecodeCache(tmp_path / "cache", 64)
    manifest = scan(make_folder(tmp_path / "d", per_class=4), cache)
    decoded = []
    original = DecodeCache.get
    monkeypatch.setattr(DecodeCache, "get", lambda self, *a: decoded.append(a) or original(self, *a))
    found = hashes(manifest.paths, manifest.digests, cache)
    assert decoded == [] and len(found) == len(manifest.samples)
    assert found == [dhash(original(cache, p, d)) for p, d in zip(manifest.paths, manifest.digests)]


@pytest.mark.data
def test_different_patients_xrays_are_not_near_copies(shared_data, tmp_path):
    """Chest X-rays all look alike at 9x8 pixels: 64-bit hashes called every test image a copy
    of some training image. The 256-bit hash must tell different patients apart, and still
    find a re-encoded, resized copy."""
    files = sorted((shared_data / "chest_xray_224" / "train" / "NORMAL").glob("IM-*.jpeg"))[:60:2]
    arrays = [decode(path.read_bytes(), 224) for path in files]
    found = [dhash(a) for a in arrays]
    assert not near_matches(found[:15], found[15:]).any()
    buffer = io.BytesIO()
    Image.fromarray(arrays[0]).resize((112, 112)).save(buffer, "JPEG", quality=60)
    assert near_matches([dhash(decode(buffer.getvalue(), 224))], found[15:] + found[:1]).tolist() == [True]
