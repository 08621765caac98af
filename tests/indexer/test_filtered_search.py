"""Metadata filters: selecting rows by SQL and searching only them inside faiss."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from indexer.faiss_index import IndexPolicy
from indexer.metadata import MAX_IN_VALUES, filter_sql
from indexer.publish import CaptionRow, ImageRow, publish_vectors
from indexer.selection import PAD_DISTANCE, FilterPolicy, SelectionCache, key_nbytes
from indexer.store import FilterError, IndexVersion, RowSelection

DIM = 16
N_IMAGES = 2400
ALBUMS = ("2023", "2024", "holiday", "work")
TAGS = ("cat", "dog", "sea", "snow")


def unit_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def fields_of(row: int) -> dict[str, Any]:
    """Deterministic metadata; every 10th image lacks a year, every 7th has no album."""
    fields: dict[str, Any] = {
        "tags": [TAGS[row % 4], TAGS[(row // 4) % 4]] if row % 5 else [],
        "favourite": row % 3 == 0,
        "rating": round((row % 50) / 10, 1),  # floats 0.0 .. 4.9
    }
    if row % 10:
        fields["year"] = 2000 + row % 25
    if row % 7:
        fields["album"] = ALBUMS[row % 4]
    return fields


IMAGE_FIELDS = [fields_of(row) for row in range(N_IMAGES)]
XB = unit_rows(N_IMAGES, seed=0)
XQ = unit_rows(5, seed=1)
# Captions 0..599 describe image (5·i + 1) mod N_IMAGES; the last 50 describe no image.
CAPTION_IMAGES: list[int | None] = [(5 * i + 1) % N_IMAGES for i in range(600)] + [None] * 50


def publish(root: Path, kind: str) -> str:
    images = [ImageRow(i, f"img-{i}", f"/g/{i}.png", (), IMAGE_FIELDS[i]) for i in range(N_IMAGES)]
    captions = [
        CaptionRow(i, f"cap-{i}", f"caption {i}", None if im is None else f"img-{im}", None)
        for i, im in enumerate(CAPTION_IMAGES)
    ]
    return publish_vectors(
        root,
        fingerprint="f" * 64,
        image_rows=images,
        image_vectors=XB,
        caption_rows=captions,
        caption_vectors=unit_rows(len(captions), seed=2),
        index=kind,
        policy=IndexPolicy(ivf_nlist=48, tuning_queries=100),
    )


@pytest.fixture(scope="module", params=["flat", "ivf", "ivf-selector"])
def version(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Flat; IVF (selections this small are searched exactly); IVF through its selector."""
    kind, _, path = request.param.partition("-")
    root = tmp_path_factory.mktemp(f"filtered-{request.param}")
    publish(root, kind)
    policy = FilterPolicy(exact_max_rows=0) if path == "selector" else None
    with IndexVersion.open(root, filter_policy=policy) as opened:
        yield opened


def matching(predicate: Callable[[dict[str, Any]], bool]) -> list[int]:
    return [row for row, fields in enumerate(IMAGE_FIELDS) if predicate(fields)]


def brute_force(xq: np.ndarray, xb: np.ndarray, rows: list[int], k: int) -> np.ndarray:
    """Exact top-k rows among ``rows``, padded with -1."""
    scores = xq @ xb[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found = np.full((len(xq), k), -1, dtype=np.int64)
    found[:, : order.shape[1]] = np.asarray(rows)[order]
    return found


# ---------------------------------------------------------------------- selecting rows
@pytest.mark.parametrize(
    ("filter", "predicate"),
    [
        ({"album": "holiday"}, lambda f: f.get("album") == "holiday"),
        ({"album": {"in": ["2023", "work"]}}, lambda f: f.get("album") in ("2023", "work")),
        ({"year": 2010}, lambda f: f.get("year") == 2010),
        ({"year": {"gte": 2020}}, lambda f: f.get("year", 0) >= 2020),
        ({"year": {"gt": 2003, "lte": 2005}}, lambda f: 2003 < f.get("year", 0) <= 2005),
        ({"rating": {"lt": 0.3}}, lambda f: f["rating"] < 0.3),
        ({"rating": {"in": [1.5, 2]}}, lambda f: f["rating"] in (1.5, 2.0)),
        ({"tags": "sea"}, lambda f: "sea" in f["tags"]),
        ({"tags": {"in": ["cat", "snow"]}}, lambda f: bool({"cat", "snow"} & set(f["tags"]))),
        ({"favourite": True}, lambda f: f["favourite"] is True),
        ({"favourite": False}, lambda f: f["favourite"] is False),
        (
            {"album": "2024", "year": {"lt": 2010}, "tags": "dog", "favourite": True},
            lambda f: (
                f.get("album") == "2024"
                and f.get("year", 9999) < 2010
                and "dog" in f["tags"]
                and f["favourite"]
            ),
        ),
    ],
)
def test_select_finds_exactly_the_matching_images(
    version: IndexVersion, filter: dict[str, Any], predicate: Callable[[dict[str, Any]], bool]
) -> None:
    selection = version.select("images", filter)
    expected = matching(predicate)
    assert selection.count == len(expected) > 0
    assert selection.rows.tolist() == expected


def test_metadata_fields_are_typed(version: IndexVersion) -> None:
    assert {name: f.type for name, f in version.metadata_fields.items()} == {
        "album": "string",
        "favourite": "boolean",
        "rating": "number",
        "tags": "string_list",
        "year": "number",
    }
    assert list(version.metadata_fields) == sorted(version.metadata_fields)


def test_an_empty_filter_selects_every_row(version: IndexVersion) -> None:
    assert version.select("images", {}).count == N_IMAGES
    assert version.select("captions", {}).count == len(CAPTION_IMAGES)


def test_captions_match_through_the_image_they_describe(version: IndexVersion) -> None:
    selection = version.select("captions", {"album": "work"})
    expected = [
        caption
        for caption, image in enumerate(CAPTION_IMAGES)
        if image is not None and IMAGE_FIELDS[image].get("album") == "work"
    ]
    assert selection.rows.tolist() == expected
    assert len(expected) > 0
    assert version.select("captions", {"year": {"gte": 0}}).count == sum(
        1 for image in CAPTION_IMAGES if image is not None and "year" in IMAGE_FIELDS[image]
    )  # the 50 captions without an image never match


@pytest.mark.parametrize(
    ("filter", "field", "message"),
    [
        ({"albm": "x"}, "albm", "unknown metadata field 'albm'; known fields: album, favourite"),
        ({"year": {"between": [1, 2]}}, "year", "allowed operators: in, gte, gt, lte, lt"),
        ({"year": "2010"}, "year", "'year' is a number"),
        ({"favourite": 1}, "favourite", "'favourite' is a boolean"),
        ({"year": True}, "year", "'year' is a number"),
        ({"album": 2024}, "album", "'album' is a string"),
        ({"tags": {"gte": 1}}, "tags", "applies to number fields only"),
        ({"album": {"in": []}}, "album", "'in' takes a list of 1 to 1000"),
        ({"album": {"in": ["x"] * (MAX_IN_VALUES + 1)}}, "album", "'in' takes a list"),
        ({"album": {"in": ["2023", 5]}}, "album", "'album' is a string"),
        ({"album": ["2023", "2024"]}, "album", '{"in": [...]}'),
        ({"album": None}, "album", "'album' is a string"),
        ({"album": {}}, "album", "an empty condition"),
        ({"year": {"gte": float("nan")}}, "year", "'year' is a number"),
        ({"year": 10**400}, "year", "an integer of 401 digits is beyond the range"),
        ({"year": {"in": [2020, -(10**400)]}}, "year", "an integer of 401 digits"),
        ({"year": {"lt": 10**400}}, "year", "an integer of 401 digits"),
        ({"year": {"gte": 10**5000}}, "year", "an integer of about 5001 digits"),
        ({"album": "\ud800"}, "album", "not valid UTF-8 text"),
        ({"album": {"in": ["2023", "x\udfff"]}}, "album", "not valid UTF-8 text"),
    ],
)
def test_bad_filters_name_the_field(
    version: IndexVersion, filter: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(FilterError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        version.select("images", filter)
    assert info.value.field == field
    assert info.value.known == ["album", "favourite", "rating", "tags", "year"]


def test_a_filter_field_name_that_is_not_utf8_is_refused(version: IndexVersion) -> None:
    with pytest.raises(FilterError, match="field name must be valid UTF-8") as info:
        version.select("images", {"\ud800": "a"})
    assert info.value.field is None


def test_a_filter_holds_at_most_64k_characters(version: IndexVersion) -> None:
    values = [f"{i:04d}" + "x" * 96 for i in range(MAX_IN_VALUES)]  # 100,000 characters
    with pytest.raises(FilterError, match="at most 65536 are allowed"):
        version.select("images", {"album": {"in": values}})
    version.select("images", {"album": {"in": values[:600]}})  # 60,000: fine


def test_a_filter_that_is_not_an_object_is_refused(version: IndexVersion) -> None:
    with pytest.raises(FilterError, match="must be a JSON object") as info:
        version.select("images", ["album"])  # type: ignore[arg-type]
    assert info.value.field is None


# ---------------------------------------------------------------------- searching them
def test_filtered_search_equals_brute_force_over_the_selection(version: IndexVersion) -> None:
    """Small selections (exact path on IVF) and a large one, against numpy over the matches."""
    for filter, predicate in [
        ({"album": "holiday", "favourite": True}, lambda f: f.get("album") == "holiday"
         and f["favourite"]),
        ({"year": 2007}, lambda f: f.get("year") == 2007),
    ]:  # fmt: skip
        selection = version.select("images", filter)
        distances, rows = version.search_images(XQ, 10, selection=selection)
        expected = brute_force(XQ, XB, matching(predicate), 10)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(
            distances, np.take_along_axis(XQ @ XB.T, expected, axis=1), atol=1e-5
        )


def test_large_selections_return_k_selected_rows(version: IndexVersion) -> None:
    selection = version.select("images", {"year": {"gte": 2005}})
    _, rows = version.search_images(XQ, 10, selection=selection)
    assert (rows >= 0).all()
    assert set(rows.ravel().tolist()) <= set(selection.rows.tolist())
    expected = brute_force(XQ, XB, selection.rows.tolist(), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, expected, strict=True)])
    assert overlap >= 0.8  # exact for flat; IVF with nprobe scaled by 1 / fraction


def test_fewer_matches_than_k_are_padded(version: IndexVersion) -> None:
    selection = version.select("images", {"year": 2001, "album": "holiday"})
    assert 0 < selection.count < 30
    distances, rows = version.search_images(XQ, 40, selection=selection)
    assert (rows[:, : selection.count] >= 0).all()
    assert (rows[:, selection.count :] == -1).all()
    assert (distances[:, selection.count :] == PAD_DISTANCE).all()
    assert sorted(rows[0, : selection.count].tolist()) == selection.rows.tolist()


def test_an_empty_selection_gives_an_empty_result(version: IndexVersion) -> None:
    selection = version.select("images", {"year": 1999})
    assert selection.count == 0
    distances, rows = version.search_images(XQ, 5, selection=selection)
    assert rows.shape == (5, 5) and (rows == -1).all() and (distances == PAD_DISTANCE).all()


def test_filtered_caption_search_returns_captions_of_matching_images(
    version: IndexVersion,
) -> None:
    selection = version.select("captions", {"tags": "cat"})
    _, rows = version.search_captions(XQ, 10, selection=selection)
    assert (rows >= 0).all()
    for row in rows.ravel().tolist():
        image = CAPTION_IMAGES[row]
        assert image is not None and "cat" in IMAGE_FIELDS[image]["tags"]


def test_a_selection_only_restricts_its_own_modality(version: IndexVersion) -> None:
    selection = version.select("captions", {"tags": "cat"})
    with pytest.raises(ValueError, match="cannot restrict a search of images"):
        version.search_images(XQ, 3, selection=selection)


def test_unfiltered_and_select_all_searches_agree(version: IndexVersion) -> None:
    _, plain = version.search_images(XQ, 10)
    _, everything = version.search_images(XQ, 10, selection=version.select("images", {}))
    np.testing.assert_array_equal(plain, everything)


# ---------------------------------------------------------------------- IVF and HNSW paths
def clustered_gallery(n_lists: int = 32, per_list: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters far apart, so IVF lists are the clusters; returns (xb, cluster of row)."""
    rng = np.random.default_rng(5)
    centres = unit_rows(n_lists, seed=6)
    cluster = np.repeat(np.arange(n_lists), per_list)
    xb = centres[cluster] + 0.05 * rng.standard_normal((len(cluster), DIM)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    return np.ascontiguousarray(xb), cluster


def test_ivf_widens_nprobe_until_k_selected_rows_are_found(tmp_path: Path) -> None:
    """Matches live only in lists far from the query: the tuned nprobe alone finds none."""
    xb, cluster = clustered_gallery()
    query = np.ascontiguousarray(xb[cluster == 0][:1])
    similarity = [float((xb[cluster == c] @ query[0]).mean()) for c in range(32)]
    far_clusters = set(np.argsort(similarity)[:3].tolist())  # the 3 least similar clusters
    images = [
        ImageRow(i, f"img-{i}", f"/g/{i}.png", (), {"far": int(cluster[i]) in far_clusters})
        for i in range(len(xb))
    ]
    policy = IndexPolicy(ivf_nlist=32, target_recall=0.5, tuning_queries=64)
    publish_vectors(
        tmp_path, fingerprint="f" * 64, image_rows=images, image_vectors=xb, index="ivf",
        policy=policy,
    )  # fmt: skip
    with IndexVersion.open(tmp_path, filter_policy=FilterPolicy(exact_max_rows=0)) as opened:
        params = opened.index_settings("images")["params"]
        assert params["nprobe"] < params["nlist"]
        selection = opened.select("images", {"far": True})
        assert 0 < selection.count < len(xb) / 4
        index = faiss.read_index(str(opened.directory / "images.faiss"))
        naive = index.search(
            query,
            10,
            params=faiss.SearchParametersIVF(sel=selection.selector, nprobe=params["nprobe"]),
        )[1]
        assert (naive == -1).any()  # what a plain filtered IVF search would return
        _, rows = opened.search_images(query, 10, selection=selection)
        np.testing.assert_array_equal(rows, brute_force(query, xb, selection.rows.tolist(), 10))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_small_selections_are_searched_exactly(tmp_path: Path, kind: str) -> None:
    publish(tmp_path, kind)
    with IndexVersion.open(tmp_path) as opened:
        selection = opened.select("images", {"tags": "snow", "year": {"lt": 2004}})
        assert 10 < selection.count <= opened.filter_policy.exact_max_rows
        _, rows = opened.search_images(XQ, 10, selection=selection)
        np.testing.assert_array_equal(rows, brute_force(XQ, XB, selection.rows.tolist(), 10))


def test_hnsw_large_selection_fills_k_from_the_selection(tmp_path: Path) -> None:
    publish(tmp_path, "hnsw")
    with IndexVersion.open(tmp_path, filter_policy=FilterPolicy(exact_max_rows=0)) as opened:
        selection = opened.select("images", {"album": "work"})
        _, rows = opened.search_images(XQ, 10, selection=selection)
        assert (rows >= 0).all() and set(rows.ravel().tolist()) <= set(selection.rows.tolist())


def test_a_selection_is_only_valid_for_its_version(tmp_path: Path) -> None:
    publish(tmp_path / "a", "flat")
    publish(tmp_path / "b", "flat")
    with IndexVersion.open(tmp_path / "a") as first, IndexVersion.open(tmp_path / "b") as second:
        selection: RowSelection = first.select("images", {"album": "work"})
        with pytest.raises(ValueError, match="cannot restrict"):
            second.search_images(XQ, 3, selection=selection)


# ---------------------------------------------------------------------- SQL, cache, threads
@pytest.mark.parametrize(
    "filter",
    [
        {"album": "work"},
        {"year": {"gte": 2003, "lt": 2010}},
        {"tags": {"in": ["cat", "sea"]}},
        {"album": "work", "year": 2004, "favourite": True},
    ],
)
def test_every_condition_is_an_index_search(tmp_path: Path, filter: dict[str, Any]) -> None:
    publish(tmp_path, "flat")
    with IndexVersion.open(tmp_path) as opened:
        sql, parameters = filter_sql(filter, opened.metadata_fields)
    connection = sqlite3.connect(next(tmp_path.glob("versions/*/metadata.sqlite")))
    plan = [row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters)]
    connection.close()
    searches = [step for step in plan if step.startswith("SEARCH image_values USING COVERING")]
    assert len(searches) == len(filter), plan  # one range scan per field, ranges together
    assert not any(step.startswith("SCAN") for step in plan), plan


def test_selections_are_reused_for_the_same_filter(tmp_path: Path) -> None:
    publish(tmp_path, "flat")
    with IndexVersion.open(tmp_path) as opened:
        first = opened.select("images", {"album": "work", "year": {"gte": 2010}})
        assert opened.select("images", {"year": {"gte": 2010}, "album": "work"}) is first
        assert opened.select("captions", {"album": "work", "year": {"gte": 2010}}) is not first
        assert opened.select("images", {"album": "work"}) is not first
    uncached = FilterPolicy(selection_cache_bytes=0)
    with IndexVersion.open(tmp_path, filter_policy=uncached) as opened:
        assert opened.select("images", {"album": "work"}) is not opened.select(
            "images", {"album": "work"}
        )


def test_concurrent_filtered_searches_agree(version: IndexVersion) -> None:
    filters = [{"album": album} for album in ALBUMS] + [{"year": {"lt": 2000 + y}} for y in (3, 9)]
    expected = [
        version.search_images(XQ, 10, selection=version.select("images", f))[1] for f in filters
    ]

    def run(i: int) -> np.ndarray:
        selection = version.select("images", filters[i % len(filters)])
        return version.search_images(XQ, 10, selection=selection)[1]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, range(60)))
    for i, rows in enumerate(results):
        np.testing.assert_array_equal(rows, expected[i % len(filters)])


def test_the_selection_cache_keeps_recent_selections_within_its_budget() -> None:
    def selection(count: int) -> RowSelection:
        return RowSelection("v", "images", np.arange(count), 800)

    sizes = [
        selection(100).nbytes + key_nbytes("first"),
        selection(50).nbytes + key_nbytes("second"),
    ]
    cache = SelectionCache(max_bytes=sizes[0] + sizes[1])
    first, second, third = selection(100), selection(50), selection(50)
    cache.put("first", first)
    cache.put("second", second)
    assert cache.get("first") is first  # now the most recent
    cache.put("third", third)  # over budget: the least recently used goes
    assert cache.get("second") is None
    assert cache.get("first") is first and cache.get("third") is third
    cache.put("huge", selection(800))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and cache.get("first") is first


def test_the_selection_cache_counts_its_keys() -> None:
    """A filter's key (its SQL and values) is memory too: a cache whose budget fits two
    selections' rows but not their keys as well keeps one."""
    first, second = (RowSelection("v", "images", np.arange(50), 800) for _ in range(2))
    first_key = ("images", "SELECT row FROM image_values WHERE field = ?", "album", "x" * 500)
    second_key = (*first_key[:3], "y" * 500)
    cache = SelectionCache(max_bytes=first.nbytes + second.nbytes + 600)
    cache.put(first_key, first)
    assert cache.nbytes == first.nbytes + key_nbytes(first_key)
    assert key_nbytes(first_key) > 500
    cache.put(second_key, second)  # over the budget with both keys: the older one goes
    assert cache.get(first_key) is None and cache.get(second_key) is second
    assert cache.nbytes == second.nbytes + key_nbytes(second_key) <= cache.max_bytes


def test_selections_with_large_keys_are_not_cached(tmp_path: Path) -> None:
    """Distinct filters with long ``in`` lists would otherwise fill the cache with keys of
    up to 64K characters each while each selection's rows are tiny."""
    publish(tmp_path, "flat")
    with IndexVersion.open(tmp_path) as opened:
        small = {"album": {"in": ["2023", "work"]}}
        assert opened.select("images", small) is opened.select("images", small)
        for i in range(20):
            large = {"album": {"in": [f"{i}-{j}-" + "x" * 50 for j in range(MAX_IN_VALUES)]}}
            selection = opened.select("images", large)
            assert selection.count == 0
            assert opened.select("images", large) is not selection
        assert len(opened._selections) == 1  # the small filter's selection only
