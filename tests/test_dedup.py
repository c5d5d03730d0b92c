"""Near-duplicate indexes (data/dedup.py): multi-index hashing equals the exact scan; SemDeDup finds planted
duplicates; prepare's catalog names what a duplicate duplicates."""
import numpy as np
import pytest

from tessera.data.dedup import EmbeddingIndex, HashIndex, exact_duplicates, exact_nearest, semdedup
from tessera.data.filters import hamming


def planted_hashes(n: int, near: int, max_flip: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random 64-bit hashes and `near` queries, each a stored hash with 0..max_flip bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    queries = []
    for i in rng.integers(0, n, near):
        h = int(hashes[i])
        for b in rng.choice(64, int(rng.integers(0, max_flip + 1)), replace=False):
            h ^= 1 << int(b)
        queries.append(h)
    return hashes, np.array(queries + list(rng.integers(0, 2**63, near, dtype=np.uint64)), dtype=np.uint64)


@pytest.mark.parametrize("radius,chunks", [(0, None), (3, 4), (6, None), (6, 8), (9, 2), (12, 4)])
def test_hash_index_finds_exactly_what_the_scan_finds(radius, chunks):
    hashes, queries = planted_hashes(3000, 200, radius + 2, seed=radius)
    index = HashIndex(radius, hashes, chunks=chunks)
    for q in queries:
        got, want = index.nearest(int(q)), exact_nearest(hashes, int(q), radius)
        assert (got is None) == (want is None)
        if want is not None:
            assert got[1] == want[1]  # the same distance (ties: any index at it is a right answer)
            assert hamming(hashes[got[0]], int(q)) == want[1]
        assert list(index.within(int(q))) == list(np.nonzero(hamming(hashes, int(q)) <= radius)[0])


def test_hash_index_grows_one_at_a_time_like_a_bulk_build():
    hashes, queries = planted_hashes(5000, 100, 6, seed=1)
    grown = HashIndex(6)
    for h in hashes:
        grown.add(int(h))
    assert len(grown) == len(hashes) and grown._indexed > 4000  # rebuilt on the way, not one long buffer
    bulk = HashIndex(6, hashes)
    assert [grown.nearest(int(q)) for q in queries] == [bulk.nearest(int(q)) for q in queries]


def test_hash_index_refuses_bad_settings():
    with pytest.raises(ValueError, match="radius"):
        HashIndex(64)
    with pytest.raises(ValueError, match="chunks"):
        HashIndex(4, chunks=3)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_embeddings(n: int, dups: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    emb = unit(rng.standard_normal((n, dim)).astype(np.float32))
    src = rng.choice(n // 2, dups, replace=False)
    dst = n // 2 + rng.choice(n - n // 2, dups, replace=False)
    emb[dst] = unit(emb[src] + 0.02 * rng.standard_normal((dups, dim)).astype(np.float32))
    return emb, src, dst


def test_semdedup_finds_planted_duplicates_and_keeps_their_originals():
    emb, src, dst = planted_embeddings(4000, 150, 32, seed=0)
    dup_of, cos = semdedup(emb, threshold=0.95, clusters=8)
    exact = exact_duplicates(emb, 0.95, np.arange(len(emb)))
    assert set(np.nonzero(exact)[0]) == set(dst)  # the planted pairs are the only ones above 0.95
    found = dup_of >= 0
    assert not found[src].any() and (found & ~exact).sum() == 0  # no false positive
    assert found[dst].mean() > 0.9  # a pair split by a cluster border is missed (recall < 1 by design)
    hit = dst[found[dst]]
    assert (cos[hit] > 0.95).all()
    pairs = dict(zip(dst, src))
    assert all(dup_of[d] == pairs[d] for d in hit)  # each names its original


def test_embedding_index_streams_the_same_answer_as_a_matrix_product():
    emb, src, dst = planted_embeddings(600, 20, 16, seed=3)
    index = EmbeddingIndex(16, threshold=0.95)
    verdicts = []
    for e in emb:
        verdicts.append(index.nearest(e))
        index.add(e)
    flagged = {i for i, v in enumerate(verdicts) if v is not None}
    assert flagged == set(dst)
    assert all(verdicts[d][0] == s for s, d in zip(src, dst))


def test_prepare_rejects_semantic_duplicates_and_remembers_them_across_a_resume(tmp_path):
    import json

    from PIL import ImageEnhance

    from conftest import photo_like
    from tessera.data.catalog import Catalog
    from tessera.data.prepare import PrepareConfig, prepare

    src = tmp_path / "src"
    src.mkdir()
    ims = [photo_like(600 + i, (128, 112)) for i in range(5)]
    for i, im in enumerate(ims):
        im.save(src / f"a{i}.png")
    # a tighter crop with stronger colour: 14 pHash bits away (not a near-duplicate), cosine 0.89 in clip-xs
    ImageEnhance.Color(ims[0].crop((12, 10, 116, 102))).enhance(1.3).save(src / "z_variant.png")
    cfg = PrepareConfig.from_options(min_size=32, phash_distance=4, semantic_dedup="clip-xs", semantic_threshold=0.85,
                                     size=64, workers=1, chunk_size=3)

    def stop(chunk):
        if chunk == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "out", cfg, progress=False, on_chunk=stop)
    assert (tmp_path / "out" / "embeddings" / "chunk-00000.npz").is_file()
    report = prepare([src], tmp_path / "out", cfg, progress=False)  # a0 was kept by the first run
    assert report["rejected_by_reason"] == {"semantic_duplicate": 1} and report["kept"] == 5
    with Catalog.read(tmp_path / "out") as cat:
        rows = {r["source"].split("/")[-1]: r for r in cat.rows()}
    v = json.loads(rows["z_variant.png"]["verdicts"])
    assert v["duplicate_of"] == rows["a0.png"]["id"] and 0.85 <= v["cosine"] < 1
    with pytest.raises(ValueError, match="cosine"):
        PrepareConfig.from_options(min_size=32, phash_distance=4, semantic_dedup="clip-xs", semantic_threshold=1.5)
