"""The HTTP inspection service (fsad-serve) in-process on the tiny model: answers equal fsad-inspect,
bad inputs get a 4xx with a reason, hot reload between bundles, the token on a public bind, 503 on
a full queue."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fsad_pipeline.inspection.inspector import inspect_images
from fsad_pipeline.inspection.service import (
    MicroBatcher,
    ModelHolder,
    QueueFull,
    ServiceError,
    ServiceSettings,
    Upload,
    check_bind,
    create_app,
)
from fsad_pipeline.model_store.bundle import export_bundle, load_bundle
from fsad_pipeline.model_store.store import ModelStore


def _texture(seed, height=48, width=48):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.25 * np.sin(xx * 0.8) * np.sin(yy * 0.8)
    return np.clip((base[..., None] + rng.normal(0, 0.03, (height, width, 3))) * 255, 0, 255).astype(np.uint8)


def _png(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _export(parts, target, threshold_shift=0.0):
    fusion = copy.deepcopy(parts["fusion"])
    fusion["threshold"]["threshold"] += threshold_shift
    export_bundle(target, config_version=1, fusion=fusion, data_fingerprint="tiny-data-hash",
                  **{k: v for k, v in parts.items() if k not in ("image_size", "fusion")})
    return target


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_parts):
    root = tmp_path_factory.mktemp("serve") / "models"
    ModelStore(root).promote(_export(tiny_model_parts, root.parent / "a"), {"reason": "test"})
    return root


@pytest.fixture
def client(store):
    settings = ServiceSettings(model_dir=store / "champion", reload_interval=0, max_body_bytes=200_000,
                               max_pixels=100_000, overlay_max_side=64)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_answer_equals_fsad_inspect_on_the_same_image(client, store, tmp_path):
    images = {"plain.png": _texture(0), "wide.png": _texture(1, 40, 80)}
    for name, array in images.items():
        (tmp_path / name).write_bytes(_png(array))
    batch = inspect_images(load_bundle(store / "champion", device="cpu"), tmp_path, tmp_path / "out",
                           progress=False, report=False)
    expected = dict(zip(batch.predictions["path"].map(lambda p: p.split("/")[-1]), batch.predictions["pred_score"]))
    for name, array in images.items():
        raw = client.post("/inspect", content=_png(array), headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        answer = raw.json()
        assert answer["pred_score"] == pytest.approx(expected[name], abs=1e-5)
        assert answer["verdict"] in ("OK", "NG") and answer["model_version"] == "v0001"
        assert answer["image"] == {"name": "body", "width": array.shape[1], "height": array.shape[0], "converted": None}
        assert set(answer["timings_ms"]) >= {"decode", "queue", "score_batch", "total"}
        multipart = client.post("/inspect", files={"file": (name, _png(array), "image/png")}).json()
        assert multipart["pred_score"] == pytest.approx(answer["pred_score"], abs=1e-6)
        assert multipart["image"]["name"] == name


def test_heatmap_png_comes_at_the_images_own_size(client):
    answer = client.post("/inspect?heatmap=png", content=_png(_texture(2, 40, 80)),
                         headers={"content-type": "application/octet-stream"}).json()
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png"])))
    assert overlay.format == "PNG" and overlay.size == (64, 32)  # 80 x 40 capped at overlay_max_side 64
    assert client.post("/inspect?heatmap=jpeg", content=_png(_texture(2)),
                       headers={"content-type": "image/png"}).status_code == 400


def test_a_batch_scores_every_good_file_and_names_each_bad_one(client):
    files = [("files", ("a.png", _png(_texture(3)), "image/png")), ("files", ("bad.png", b"not an image", "image/png")),
             ("files", ("b.png", _png(_texture(4)), "image/png"))]
    results = client.post("/inspect/batch", files=files).json()["results"]
    assert [r["status"] for r in results] == [200, 422, 200]
    assert results[1]["name"] == "bad.png" and "cannot decode" in results[1]["detail"]
    single = client.post("/inspect", content=_png(_texture(3)), headers={"content-type": "image/png"}).json()
    assert results[0]["pred_score"] == pytest.approx(single["pred_score"], abs=1e-5)


def _bomb() -> bytes:
    return _png(np.zeros((400, 400, 3), np.uint8))  # 160 000 pixels > the test's max_pixels of 100 000


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b"certainly not an image", "image/png", 422, "cannot decode"),
        (_png(_texture(5))[:120], "image/png", 422, "cannot decode"),
        (b"", "image/png", 400, "zero-byte"),
        (_bomb(), "image/png", 413, "decompression-bomb guard"),
        (b"x" * 250_000, "image/png", 413, "exceeds the limit"),
        (_png(_texture(5)), "text/plain", 415, "unsupported content type"),
        (_png(_texture(5)), "", 415, "unsupported content type"),
    ],
    ids=["not-an-image", "truncated", "zero-byte", "decompression-bomb", "body-too-large", "wrong-type", "no-type"],
)
def test_bad_input_gets_a_4xx_with_the_reason_and_the_service_lives_on(client, body, content_type, status, words):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/inspect", content=body, headers=headers)
    assert response.status_code == status and words in response.json()["detail"]
    assert client.post("/inspect", content=_png(_texture(6)), headers={"content-type": "image/png"}).status_code == 200


def test_multipart_without_a_file_or_with_two_is_refused(client):
    no_file = client.post("/inspect", files={"note": (None, "no file")})  # a multipart form without a file part
    assert no_file.status_code == 400 and "no image file" in no_file.json()["detail"]
    assert client.post("/inspect", data={"note": "no file"}).status_code == 415  # urlencoded: not an image
    two = [("a", ("a.png", _png(_texture(1)), "image/png")), ("b", ("b.png", _png(_texture(2)), "image/png"))]
    response = client.post("/inspect", files=two)
    assert response.status_code == 400 and "/inspect/batch" in response.json()["detail"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16_bit_images_are_converted(client, mode):
    rgb = _texture(7)
    if mode == "L":
        array = rgb[..., 0]
    elif mode == "RGBA":
        array = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 200, np.uint8)], axis=2)
    else:
        array = rgb[..., 0].astype(np.uint16) * 257
    answer = client.post("/inspect", content=_png(array), headers={"content-type": "image/png"}).json()
    assert answer["image"]["converted"].startswith("converted from") and np.isfinite(answer["pred_score"])


def test_an_image_far_from_the_models_aspect_is_scored_as_the_pipeline_does(client):
    answer = client.post("/inspect", content=_png(_texture(8, 20, 200)), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["image"]["width"] == 200


def test_health_and_model_describe_the_champion(client):
    assert client.get("/health").json() == {"status": "ok", "model_version": "v0001"}
    model = client.get("/model").json()
    assert model["version"] == "v0001" and model["backbone"] == "efficientnet_lite0" and model["image_size"] == [32, 32]
    assert model["scorers"] and model["threshold_method"] and model["data_fingerprint"] == "tiny-data-hash"
    assert model["reloads"] == 0 and model["last_reload_error"] is None


def test_hot_reload_swaps_in_a_new_champion_and_refuses_a_broken_one(tmp_path, tiny_model_parts):
    root = tmp_path / "models"
    store = ModelStore(root)
    store.promote(_export(tiny_model_parts, tmp_path / "a"), {"reason": "first"})
    settings = ServiceSettings(model_dir=root / "champion", reload_interval=0)
    holder = ModelHolder(root / "champion")
    with TestClient(create_app(settings, holder=holder)) as client:
        image = _png(_texture(9))
        before = client.post("/inspect", content=image, headers={"content-type": "image/png"}).json()
        store.promote(_export(tiny_model_parts, tmp_path / "b", threshold_shift=1e6), {"reason": "second"})
        assert client.get("/model").json()["version"] == "v0001"  # nothing changes until the check
        assert holder.refresh() and not holder.refresh()
        model = client.get("/model").json()
        assert model["version"] == "v0002" and model["reloads"] == 1
        after = client.post("/inspect", content=image, headers={"content-type": "image/png"}).json()
        assert after["model_version"] == "v0002" and after["threshold"] == pytest.approx(before["threshold"] + 1e6)
        assert after["pred_score"] == pytest.approx(before["pred_score"], abs=1e-6) and after["verdict"] == "OK"

        # A newly promoted bundle whose file no longer matches its checksum is refused; v0002 stays.
        entry = store.promote(_export(tiny_model_parts, tmp_path / "c", threshold_shift=2e6), {"reason": "third"})
        (entry.path / "support_images.npy").write_bytes(b"tampered")
        assert not holder.refresh()
        model = client.get("/model").json()
        assert model["version"] == "v0002" and "v0003 refused" in model["last_reload_error"]
        assert client.post("/inspect", content=image, headers={"content-type": "image/png"}).json()["model_version"] == "v0002"


def test_a_promotion_during_the_first_load_is_picked_up_by_the_next_refresh(tmp_path, tiny_model_parts):
    """The holder remembers what it loaded, not what the link says after loading: a champion
    promoted while the first one loads is swapped in at the next refresh, not missed for good."""
    root = tmp_path / "models"
    store = ModelStore(root)
    store.promote(_export(tiny_model_parts, tmp_path / "a"), {"reason": "first"})

    def load_while_promoting(path, expect, device="cpu"):
        bundle = load_bundle(path, expect, device=device)
        store.promote(_export(tiny_model_parts, tmp_path / "b", threshold_shift=1.0), {"reason": "during the load"})
        return bundle

    holder = ModelHolder(root / "champion", loader=load_while_promoting)
    assert holder.current.version == "v0001"
    holder._loader = None  # the next load is a plain one
    assert holder.refresh() and holder.current.version == "v0002"


def test_a_bundle_is_read_from_one_version_even_when_the_link_flips_after_the_check(tmp_path, tiny_model_parts):
    root = tmp_path / "models"
    store = ModelStore(root)
    store.promote(_export(tiny_model_parts, tmp_path / "a"), {"reason": "first"})
    bundle = load_bundle(root / "champion", device="cpu")
    store.promote(_export(tiny_model_parts, tmp_path / "b", threshold_shift=1.0), {"reason": "second"})
    assert bundle.root == (root / "versions" / "v0001").resolve() or bundle.root.name == "v0001"
    assert bundle.promotion["version"] == "v0001"  # read from the version loaded, not the link


def test_the_poller_reloads_by_itself(tmp_path, tiny_model_parts):
    root = tmp_path / "models"
    store = ModelStore(root)
    store.promote(_export(tiny_model_parts, tmp_path / "a"), {"reason": "first"})
    with TestClient(create_app(ServiceSettings(model_dir=root / "champion", reload_interval=0.05))) as client:
        store.promote(_export(tiny_model_parts, tmp_path / "b", threshold_shift=1.0), {"reason": "second"})
        deadline = time.monotonic() + 30
        while client.get("/health").json()["model_version"] != "v0002" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["model_version"] == "v0002"


def test_a_public_bind_needs_a_token_and_requests_need_it_too(store):
    with pytest.raises(ValueError, match="FSAD_SERVE_TOKEN"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ValueError, match="needs a token"):
        create_app(ServiceSettings(model_dir=store / "champion", host="192.168.1.20"))
    check_bind("127.0.0.1", None), check_bind("::1", None), check_bind("localhost", None)
    settings = ServiceSettings(model_dir=store / "champion", host="0.0.0.0", token="s3cret", reload_interval=0)
    with TestClient(create_app(settings)) as client:
        image, png = _png(_texture(10)), {"content-type": "image/png"}
        assert client.get("/health").status_code == 200  # liveness without the token
        assert client.get("/model").status_code == 401
        assert client.post("/inspect", content=image, headers=png).status_code == 401
        assert client.post("/inspect", content=image, headers={**png, "authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/inspect", content=image, headers={**png, "authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_queue_answers_503_at_once():
    release = threading.Event()

    def slow(uploads):
        release.wait(10)
        return [{"ok": True} for _ in uploads]

    async def scenario():
        batcher = MicroBatcher(slow, max_batch=1, max_wait_ms=0, queue_size=1)
        batcher.start()
        upload = Upload("x", np.zeros((4, 4, 3), np.uint8), (4, 4), "", False, 0.0)
        first = asyncio.create_task(batcher.submit(upload))   # taken by the worker, blocked in slow()
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(upload))  # waits in the queue (size 1)
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(QueueFull):
            await batcher.submit(upload)
        refused_in = time.perf_counter() - started
        release.set()
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return refused_in, results, batcher.batches

    refused_in, results, batches = asyncio.run(scenario())
    assert refused_in < 0.05 and results == [{"ok": True}, {"ok": True}] and batches == 2


def test_concurrent_requests_share_a_forward_and_a_full_queue_is_a_503_over_http(store, monkeypatch):
    import fsad_pipeline.inspection.service as service

    real = service.score_uploads
    sizes = []

    def recorded(model, uploads, **kwargs):
        sizes.append(len(uploads))
        time.sleep(0.2)
        return real(model, uploads, **kwargs)

    monkeypatch.setattr(service, "score_uploads", recorded)
    settings = ServiceSettings(model_dir=store / "champion", reload_interval=0, max_batch=4, max_wait_ms=50, queue_size=4)
    app = create_app(settings)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                image = _png(_texture(11))
                requests = [http.post("/inspect", content=image, headers={"content-type": "image/png"}) for _ in range(12)]
                return await asyncio.gather(*requests)

    responses = asyncio.run(scenario())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    assert max(sizes) > 1  # requests were batched
    assert all("queue is full" in r.json()["detail"] for r in responses if r.status_code == 503)


def test_an_unexpected_error_is_a_500_with_one_log_line_and_no_traceback(store, monkeypatch, caplog):
    import logging

    import fsad_pipeline.inspection.service as service

    def broken(name, data, settings, heatmap, size):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "_decode", broken)
    with TestClient(create_app(ServiceSettings(model_dir=store / "champion", reload_interval=0)),
                    raise_server_exceptions=False) as client:
        with caplog.at_level(logging.ERROR):
            response = client.post("/inspect", content=b"x", headers={"content-type": "image/png"})
        assert response.status_code == 500 and response.json() == {"detail": "internal error"}
        assert client.get("/health").status_code == 200
    assert any("RuntimeError: boom" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(client):
    """No Content-Length (chunked transfer): the limit is applied to the bytes as they arrive."""
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000  # 300 000 bytes > the client's 200 000 limit

    response = client.post("/inspect", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_a_very_thin_image_is_fitted_without_blowing_up_memory(client):
    """A 1 x 20 000 strip: covering 32 x 32 by resizing first would need a 20 000 x 20 000 image."""
    import tracemalloc

    strip = np.tile(_texture(12, 1, 400), (1, 50, 1))  # 1 x 20 000
    tracemalloc.start()
    response = client.post("/inspect", content=_png(strip), headers={"content-type": "image/png"})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert response.status_code == 200 and response.json()["image"]["width"] == 20_000
    assert peak < 50 * 2**20


def test_one_failing_image_does_not_fail_the_others_in_its_batch():
    """The batch is scored again image by image: only the one that fails gets the 500."""
    def score(uploads):
        if any(u.name == "bad" for u in uploads):
            raise RuntimeError("this image breaks the model")
        return [{"name": u.name} for u in uploads]

    async def scenario():
        batcher = MicroBatcher(score, max_batch=4, max_wait_ms=100, queue_size=8)
        batcher.start()
        uploads = [Upload(name, np.zeros((4, 4, 3), np.uint8), (4, 4), "", False, 0.0) for name in ("a", "bad", "b")]
        outcomes = await asyncio.gather(*(batcher.submit(u) for u in uploads), return_exceptions=True)
        await batcher.stop()
        return outcomes

    first, bad, last = asyncio.run(scenario())
    assert first == {"name": "a"} and last == {"name": "b"}
    assert isinstance(bad, ServiceError) and bad.status == 500


def test_a_score_that_is_not_a_number_is_an_ng_verdict_in_valid_json(store):
    import fsad_pipeline.inspection.service as service

    model = service.load_model(store / "champion")
    original = model.ensemble.fusion.fuse

    def nan_fuse(outputs):
        fused = original(outputs)
        return {**fused, "pred_score": np.full_like(np.asarray(fused["pred_score"], dtype=np.float64), np.nan)}

    model.ensemble.fusion.fuse = nan_fuse
    upload = Upload("x", _texture(13, 32, 32), (32, 32), "", False, 0.0)
    (answer,) = service.score_uploads(model, [upload])
    assert answer["pred_score"] is None and answer["verdict"] == "NG" and json.dumps(answer, allow_nan=False)


def test_a_model_that_does_not_match_the_project_is_refused(store):
    from fsad_pipeline.model_store.bundle import BundleMismatchError

    with pytest.raises(BundleMismatchError, match="image_size"):
        create_app(ServiceSettings(model_dir=store / "champion", expect={"image_size": 256}))


def test_a_threshold_override_applies_to_verdicts_and_is_reported(store):
    settings = ServiceSettings(model_dir=store / "champion", reload_interval=0, threshold=-1e9)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/inspect", content=_png(_texture(14)), headers={"content-type": "image/png"}).json()
        assert answer["verdict"] == "NG" and answer["threshold"] == -1e9
        model = client.get("/model").json()
        assert model["threshold"] == -1e9 and model["threshold_method"] == "override" and "model_threshold" in model


def test_a_batch_larger_than_the_queue_is_refused_whole_with_413_not_a_retry(store):
    """Three files never fit a queue of two, however idle: 413 with the limit (a 503 would say
    "retry shortly", forever); the limit is in /model."""
    settings = ServiceSettings(model_dir=store / "champion", reload_interval=0, queue_size=2)
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"{i}.png", _png(_texture(i)), "image/png")) for i in range(3)]
        response = client.post("/inspect/batch", files=files)
        assert response.status_code == 413 and "at most 2 per batch" in response.json()["detail"]
        assert client.get("/model").json()["limits"]["max_files_per_batch"] == 2
        assert client.post("/inspect/batch", files=files[:2]).status_code == 200
