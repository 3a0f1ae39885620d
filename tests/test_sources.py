"""Image sources (shapes, custom folder, COCO) and preprocessing (ADM center crop, conversions, bad inputs)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest import BAD_CORPUS, jpeg_bytes, photo, png_chunks, write_coco
from ditpipe.pipeline.config import DataConfig
from ditpipe.pipeline.errors import DataError
from ditpipe.pipeline.sources import (
    SHAPES_CLASS_NAMES,
    BadImage,
    center_crop,
    load_image,
    make_source,
    render_shape,
    shape_params,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # docs/design.md, shapes: red, green, blue, yellow


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center_crop_arr, as in guided-diffusion and facebookresearch/DiT (train.py), written out independently."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def data(**kw) -> DataConfig:
    return DataConfig(**kw)


# ---------------------------------------------------------------------------------------------------- shapes


def _dominant_color(pixels: np.ndarray) -> tuple[int, int, int]:
    """The most common saturated colour among the lit pixels (each channel thresholded at half)."""
    lit = pixels[pixels.max(-1) > 0]
    binary = [tuple(int(v) * 255 for v in (p > 127)) for p in lit]
    values, counts = np.unique(np.array(binary), axis=0, return_counts=True)
    return tuple(int(v) for v in values[np.argmax(counts)])


def _coverage(pixels: np.ndarray) -> tuple[float, tuple[int, int, int, int]]:
    """(anti-aliased area in pixels, bounding box (y0, y1, x0, x1) inclusive) of the non-black pixels."""
    intensity = pixels.max(-1).astype(np.float64) / 255.0
    ys, xs = np.nonzero(intensity > 0)
    return float(intensity.sum()), (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))


def test_shapes_deterministic_from_seed_and_index():
    a = [render_shape(3, i, 32).pixels for i in range(20)]
    b = [render_shape(3, i, 32).pixels for i in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # Rendering order does not matter: index 7 alone is the same as index 7 in the sequence.
    assert np.array_equal(render_shape(3, 7, 32).pixels, a[7])
    other = [render_shape(4, i, 32).pixels for i in range(20)]
    assert sum(not np.array_equal(x, y) for x, y in zip(a, other)) >= 18
    # Different indices give different images too.
    assert len({x.tobytes() for x in a}) == 20
    # Through the Source: two builds with the same config agree, item for item.
    s1 = make_source(data(dataset_name="shapes", num_samples=12, image_size=16, seed=5))
    s2 = make_source(data(dataset_name="shapes", num_samples=12, image_size=16, seed=5))
    assert [it.label for it in s1.items] == [it.label for it in s2.items]
    assert all(np.array_equal(s1.load(i).pixels, s2.load(i).pixels) for i in range(12))
    assert s1.load(3).sha256 == s2.load(3).sha256


def test_shapes_source_labels_keys_and_class_names():
    src = make_source(data(dataset_name="shapes", num_samples=200, image_size=32, seed=1))
    assert len(src) == 200 and src.name == "shapes"
    assert src.class_names == SHAPES_CLASS_NAMES
    assert src.class_names == ["red_circle", "red_square", "green_circle", "green_square",
                               "blue_circle", "blue_square", "yellow_circle", "yellow_square"]
    for i, item in enumerate(src.items):
        color, kind = shape_params(1, i, 32)[:2]
        assert item.label == 2 * color + kind
        assert "." not in item.key
        meta = src.sample_meta(i)
        assert meta["label"] == item.label and meta["class_name"] == SHAPES_CLASS_NAMES[item.label]
    assert len({it.key for it in src.items}) == 200
    assert {it.label for it in src.items} == set(range(8))  # all classes occur in 200 draws


def test_shapes_pixels_match_label():
    """The rendered picture really is the labelled class: colour by majority, circle vs square by bbox fill."""
    size = 64
    src = make_source(data(dataset_name="shapes", num_samples=80, image_size=size, seed=2))
    fills = {0: [], 1: []}
    for i, item in enumerate(src.items):
        px = src.load(i).pixels
        assert px.shape == (size, size, 3) and px.dtype == np.uint8
        color, kind = divmod(item.label, 2)
        assert _dominant_color(px) == COLORS[color], (i, item.label)
        area, (y0, y1, x0, x1) = _coverage(px)
        fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
        fills[kind].append(fill)
        if kind == 0:
            assert fill < 0.83, (i, fill)  # π/4 ≈ 0.785 for a disc
        else:
            assert fill > 0.83, (i, fill)  # ≈ 1 for a square (less a partial-pixel rim)
    assert fills[0] and fills[1]
    assert abs(np.mean(fills[0]) - math.pi / 4) < 0.06
    assert np.mean(fills[1]) > 0.9


@pytest.mark.parametrize("size", [16, 40])
def test_shapes_fully_inside_and_sized(size):
    extents = []
    for i in range(150):
        color, kind, extent, x0, y0 = shape_params(0, i, size)
        extents.append(extent)
        assert size / 4 <= extent <= 3 * size / 4
        assert 0 <= x0 and x0 + extent <= size and 0 <= y0 and y0 + extent <= size
        px = render_shape(0, i, size).pixels
        assert px.shape == (size, size, 3) and px.dtype == np.uint8
        # Outside the shape's box everything is black (the border around the shape).
        lit = px.max(-1) > 0
        box = np.zeros_like(lit)
        box[math.floor(y0) : math.ceil(y0 + extent), math.floor(x0) : math.ceil(x0 + extent)] = True
        assert not (lit & ~box).any(), i
        # The whole shape is drawn: its anti-aliased area equals the ideal one (a clipped shape would lose mass).
        area, (by0, by1, bx0, bx1) = _coverage(px)
        ideal = math.pi / 4 * extent**2 if kind == 0 else extent**2
        assert abs(area / ideal - 1) < 0.08, (i, area, ideal)
        assert size / 4 - 1 <= by1 - by0 + 1 <= 3 * size / 4 + 2
        assert size / 4 - 1 <= bx1 - bx0 + 1 <= 3 * size / 4 + 2
        # Only the class colour (scaled by coverage at the edges) appears: no other hue.
        rgb = np.array(COLORS[color], dtype=np.float64) / 255
        flat = px.reshape(-1, 3).astype(np.float64)
        assert np.allclose(flat, np.outer(flat.max(-1), rgb), atol=1.0)
    # The sizes span the allowed range rather than one value.
    assert min(extents) < 0.35 * size and max(extents) > 0.65 * size


def test_shapes_at_16px_through_the_source():
    src = make_source(data(dataset_name="shapes", num_samples=40, image_size=16))
    assert src.image_size == 16
    for i, item in enumerate(src.items):
        px = src.load(i).pixels
        assert px.shape == (16, 16, 3)
        assert _dominant_color(px) == COLORS[item.label // 2]
        assert (px.max(-1) > 0).sum() >= 9  # at least a 4x4 shape's worth of lit pixels, ~ (16/4)^2


# ---------------------------------------------------------------------------------------------------- custom


def _save(path, img: Image.Image | None = None, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    (photo(40, 36, seed) if img is None else img).save(path)


def _custom(root, **kw):
    return make_source(data(dataset_name="custom", dataset_path=str(root), num_samples=None, image_size=24, **kw))


def test_custom_labels_from_sorted_first_level_folders(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "zebra" / "z1.jpg", seed=1)
    _save(root / "apple" / "a1.png", seed=2)
    _save(root / "apple" / "deep" / "er" / "a2.jpg", seed=3)  # recursive: still class "apple"
    _save(root / "mango" / "m1.JPG", seed=4)  # extension case does not matter
    _save(root / "mango" / ".hidden.jpg", seed=5)  # hidden file: ignored
    _save(root / ".cache" / "c.jpg", seed=6)  # hidden folder: not a class, not an input
    (root / "apple" / "readme.md").write_text("not an image")
    src = _custom(root)
    assert src.class_names == ["apple", "mango", "zebra"]
    files = {it.file: it.label for it in src.items}
    assert files == {"apple/a1.png": 0, "apple/deep/er/a2.jpg": 0, "mango/m1.JPG": 1, "zebra/z1.jpg": 2}
    assert all(it.problem is None for it in src.items)
    keys = [it.key for it in src.items]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    for i, it in enumerate(src.items):
        meta = src.sample_meta(i)
        assert meta["label"] == it.label and meta["class_name"] == src.class_names[it.label]
        assert meta["file"] == it.file
        loaded = src.load(i)
        assert loaded.pixels.shape == (24, 24, 3)
    # The decoded pixels are those of the listed file (not of another one).
    i = [it.file for it in src.items].index("zebra/z1.jpg")
    expect = center_crop_arr(Image.open(root / "zebra" / "z1.jpg").convert("RGB"), 24)
    assert np.array_equal(src.load(i).pixels, expect)
    assert src.params["num_inputs_available"] == 4


def test_custom_top_level_images_beside_class_folders_are_skipped(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "cats" / "c.jpg")
    _save(root / "dogs" / "d.jpg")
    _save(root / "stray.jpg")
    src = _custom(root)
    assert src.class_names == ["cats", "dogs"]
    stray = [i for i, it in enumerate(src.items) if it.file == "stray.jpg"]
    assert len(stray) == 1
    assert src.items[stray[0]].label is None
    with pytest.raises(BadImage, match="outside the class folders"):
        src.load(stray[0])
    # Its per-sample record (what the manifest's skip list uses) still names the file, without a label.
    meta = src.sample_meta(stray[0])
    assert meta["file"] == "stray.jpg" and "label" not in meta and "class_name" not in meta
    others = [i for i in range(len(src)) if i != stray[0]]
    assert all(src.load(i).pixels.shape == (24, 24, 3) for i in others)


def test_custom_flat_folder_is_unconditional(tmp_path):
    root = tmp_path / "flat"
    for k in range(3):
        _save(root / f"img{k}.png", seed=k)
    (root / "notes.txt").write_text("a caption for nobody")
    src = _custom(root)
    assert src.class_names is None
    assert [it.file for it in src.items] == ["img0.png", "img1.png", "img2.png"]
    assert all(it.label is None and it.problem is None for it in src.items)
    meta = src.sample_meta(0)
    assert "label" not in meta and "class_name" not in meta


def test_custom_sidecar_captions(tmp_path):
    root = tmp_path / "caps"
    _save(root / "a.jpg", seed=1)
    _save(root / "b.png", seed=2)
    (root / "a.txt").write_text("a red thing\n\n  a second caption  \n")
    flat = _custom(root)
    _save(root / "cls" / "sub" / "c.jpg", seed=3)  # now a labelled layout; captions are read recursively too
    (root / "cls" / "sub" / "c.txt").write_text("deep caption\n")
    src = _custom(root)
    caps = {it.file: list(it.captions) for it in src.items}
    assert caps["a.jpg"] == ["a red thing", "a second caption"]
    assert caps["b.png"] == []
    assert caps["cls/sub/c.jpg"] == ["deep caption"]
    assert {it.file: list(it.captions) for it in flat.items} == {"a.jpg": caps["a.jpg"], "b.png": []}
    i = [it.file for it in flat.items].index("a.jpg")
    assert flat.sample_meta(i)["captions"] == ["a red thing", "a second caption"]
    j = [it.file for it in flat.items].index("b.png")
    assert "captions" not in flat.sample_meta(j)


def test_custom_metadata_jsonl_captions(tmp_path):
    root = tmp_path / "meta"
    _save(root / "x.jpg", seed=1)
    _save(root / "y.jpg", seed=2)
    _save(root / "z.jpg", seed=3)
    (root / "z.txt").write_text("sidecar for z\n")  # used when metadata.jsonl has no entry for z
    lines = [{"file_name": "x.jpg", "text": "caption of x"},
             {"file_name": "./y.jpg", "captions": ["y one", "y two"]},
             {"file_name": "x.jpg", "caption": "another for x"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    src = _custom(root)
    caps = {it.file: list(it.captions) for it in src.items}
    assert caps == {"x.jpg": ["caption of x", "another for x"], "y.jpg": ["y one", "y two"], "z.jpg": ["sidecar for z"]}


@pytest.mark.parametrize("bad_path", ["../x.jpg", "sub/../../x.jpg"])
def test_custom_metadata_path_escaping_root_is_refused(tmp_path, bad_path):
    root = tmp_path / "meta"
    _save(root / "a.jpg")
    _save(tmp_path / "x.jpg")  # the escape target exists, so only the root check can refuse it
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": bad_path, "text": "sneaky"}) + "\n")
    with pytest.raises(DataError, match="escapes the dataset root"):
        _custom(root)


def test_custom_metadata_absolute_path_is_refused(tmp_path):
    root = tmp_path / "meta"
    _save(root / "a.jpg")
    _save(tmp_path / "x.jpg")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": str(tmp_path / "x.jpg"), "text": "t"}) + "\n")
    with pytest.raises(DataError, match="escapes"):
        _custom(root)


def test_custom_metadata_malformed_line_is_a_data_error(tmp_path):
    root = tmp_path / "meta"
    _save(root / "a.jpg")
    (root / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2"):
        _custom(root)


def test_custom_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "imgs"
    with pytest.raises(DataError) as err:
        _custom(missing)
    assert str(missing) in str(err.value)


def test_custom_folder_without_images(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        _custom(root)


def test_custom_num_samples_subset(tmp_path):
    root = tmp_path / "many"
    for k in range(30):
        _save(root / f"c{k % 3}" / f"{k:03d}.png", photo(8, 8, k))
    full = _custom(root)
    sub = make_source(data(dataset_name="custom", dataset_path=str(root), num_samples=10, image_size=8))
    files = [it.file for it in sub.items]
    assert len(files) == 10 and set(files) < {it.file for it in full.items}
    assert files == sorted(files)
    assert sub.class_names == full.class_names  # the label space does not depend on the subset
    assert all(sub.class_names[it.label] == it.file.split("/")[0] for it in sub.items)


# ---------------------------------------------------------------------------------------------------- coco


def _coco(root, **kw):
    kw.setdefault("num_samples", None)
    return make_source(data(dataset_name="coco", dataset_path=str(root), split="val", image_size=32, **kw))


def test_coco_fixture_layout_with_all_captions(coco_root):
    src = _coco(coco_root)
    assert src.name == "coco" and src.class_names is None
    assert len(src) == 6
    assert [it.file for it in src.items] == [f"val2017/{1000 + i:012d}.jpg" for i in range(6)]
    for i, it in enumerate(src.items):
        assert list(it.captions) == [f"image {i} caption {k}" for k in range(5)]
        assert it.label is None
        meta = src.sample_meta(i)
        assert meta["captions"] == list(it.captions) and "label" not in meta
        assert src.load(i).pixels.shape == (32, 32, 3)
    keys = [it.key for it in src.items]
    assert len(set(keys)) == 6 and not any("." in k for k in keys)
    assert src.params["split"] == "val" and src.params["captions_file"] is True


def test_coco_num_samples_is_deterministic_nested_and_spread(tmp_path):
    root = tmp_path / "coco"
    names = write_coco(root, "train", n=40, captions_per_image=1)

    def files(n, seed=0):
        return [it.file for it in make_source(data(dataset_name="coco", dataset_path=str(root), split="train",
                                                   num_samples=n, seed=seed, image_size=16)).items]

    f10, f25 = files(10), files(25)
    assert len(f10) == 10 and len(f25) == 25
    assert f10 == files(10)  # deterministic
    assert set(f10) < set(f25)  # nested
    assert f10 == sorted(f10)
    first10 = [f"train2017/{n}" for n in sorted(names)[:10]]
    assert f10 != first10  # spread over the set, not the first N
    assert max(f10) > sorted(f"train2017/{n}" for n in names)[20]
    assert files(10, seed=1) != f10  # the seed picks the subset
    assert files(40) == files(None) == [f"train2017/{n}" for n in sorted(names)]
    # Captions stay attached to their own image in a subset.
    src = make_source(data(dataset_name="coco", dataset_path=str(root), split="train", num_samples=10, image_size=16))
    for it in src.items:
        i = int(it.file.split("/")[1].split(".")[0]) - 1000
        assert list(it.captions) == [f"image {i} caption 0"]


def test_coco_missing_folder_says_where_and_download(tmp_path):
    root = tmp_path / "no-coco"
    with pytest.raises(DataError) as err:
        _coco(root)
    msg = str(err.value)
    assert "--download" in msg
    assert str(root / "val2017") in msg
    assert "annotations/captions_val2017.json" in msg


def test_coco_without_annotations_lists_the_folder(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, n=3)
    (root / "annotations" / "captions_val2017.json").unlink()
    src = _coco(root)
    assert [it.file for it in src.items] == [f"val2017/{1000 + i:012d}.jpg" for i in range(3)]
    assert all(it.captions == () for it in src.items)


def test_coco_annotation_path_escaping_is_refused(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, n=2)
    ann = root / "annotations" / "captions_val2017.json"
    doc = json.loads(ann.read_text())
    doc["images"][0]["file_name"] = "../../secret.jpg"
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="escapes"):
        _coco(root)


def test_coco_broken_annotations_is_a_data_error(tmp_path):
    root = tmp_path / "coco"
    write_coco(root, n=2)
    (root / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="captions_val2017.json"):
        _coco(root)


# ---------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("w,h,size", [(300, 200, 64), (200, 301, 64), (1000, 130, 32), (128, 97, 32),
                                      (64, 160, 32), (97, 45, 32), (40, 30, 64)])
def test_center_crop_matches_adm(w, h, size):
    img = photo(w, h, seed=w + h)
    notes: list[str] = []
    got = center_crop(img, size, notes)
    expect = center_crop_arr(img, size)
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    assert np.array_equal(got, expect)
    assert (notes == [f"upscaled from {w}x{h}"]) == (min(w, h) < size)


def test_load_png_equals_adm_pipeline(tmp_path):
    path = tmp_path / "p.png"
    photo(300, 170, 9).save(path)
    loaded = load_image(path, 64)
    assert loaded.notes == []
    assert np.array_equal(loaded.pixels, center_crop_arr(Image.open(path).convert("RGB"), 64))
    import hashlib

    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jpeg_draft_decoding_close_to_full_decode(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(photo(1024, 768, 3)))
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # record what the real draft does; it still does it
        before = self.size
        result = original(self, mode, size)
        scales.append((before, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = load_image(path, 64).pixels
    # The reduced-scale DCT decode was taken: the image was decoded smaller than 1024x768 but still covers 64 px.
    assert scales and scales[0][0] == (1024, 768)
    dw, dh = scales[0][1]
    assert dw < 1024 and min(dw, dh) >= 64
    monkeypatch.undo()
    full = center_crop_arr(Image.open(path).convert("RGB"), 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - full.astype(int))
    assert diff.mean() < 3 and diff.max() < 40
    # The comparison can fail: a mis-cropped image (shifted by a few pixels) is far off.
    assert np.abs(np.roll(got, 4, axis=1).astype(int) - full).mean() > 3


def test_jpeg_without_reduction_is_exact(tmp_path):
    """640x480 at 256 px: no DCT scale fits, so the result is exactly the full decode's ADM crop."""
    path = tmp_path / "coco-like.jpg"
    path.write_bytes(jpeg_bytes(photo(640, 480, 4)))
    assert np.array_equal(load_image(path, 256).pixels, center_crop_arr(Image.open(path).convert("RGB"), 256))


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["good.jpg", *BAD_CORPUS])
def test_bad_corpus_outcome(bad_corpus, name):
    folder, expected = bad_corpus
    kind, fragment = expected[name]
    if kind == "skip":
        with pytest.raises(BadImage) as err:
            load_image(folder / name, 24)
        assert fragment in str(err.value)
    else:
        loaded = load_image(folder / name, 24)
        assert loaded.pixels.shape == (24, 24, 3) and loaded.pixels.dtype == np.uint8
        if kind == "ok":
            assert loaded.notes == []
        else:
            assert any(fragment in n for n in loaded.notes), loaded.notes


def test_bad_corpus_through_the_custom_source(bad_corpus):
    folder, expected = bad_corpus
    src = _custom(folder)
    assert src.class_names is None
    assert sorted(it.file for it in src.items) == sorted(expected)
    for i, it in enumerate(src.items):
        kind, fragment = expected[it.file]
        if kind == "skip":
            with pytest.raises(BadImage, match=fragment):
                src.load(i)
        else:
            notes = src.load(i).notes
            assert kind == "ok" or any(fragment in n for n in notes), (it.file, notes)


def test_exif_rotated_image_comes_out_rotated(bad_corpus):
    folder, _ = bad_corpus
    loaded = load_image(folder / "rotated.jpg", 24)
    raw = Image.open(folder / "rotated.jpg").convert("RGB")  # no transpose: 60 wide, 30 tall
    assert raw.size == (60, 30)
    by_hand = Image.fromarray(np.rot90(np.asarray(raw), k=-1).copy())  # orientation 6: 90° clockwise
    assert by_hand.size == (30, 60)
    assert np.array_equal(loaded.pixels, center_crop_arr(by_hand, 24))
    assert not np.array_equal(loaded.pixels, center_crop_arr(raw, 24))
    # And in content terms: photo() puts a red ramp left→right; after a clockwise turn it runs top→bottom.
    red = loaded.pixels[..., 0].astype(float)
    assert red[-1].mean() - red[0].mean() > 50
    assert abs(red[:, -1].mean() - red[:, 0].mean()) < 15


def test_gray16_is_scaled_not_clipped(bad_corpus):
    folder, _ = bad_corpus
    with Image.open(folder / "gray16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit image
    px = load_image(folder / "gray16.png", 24).pixels.astype(float)
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    assert 90 < px.mean() < 165  # a 0..65535 ramp: mid-gray on average; clipping would give ~255
    assert px.min() < 40 and px.max() > 215
    rows = px[..., 0].mean(axis=1)  # the ramp runs row by row, so row means increase strictly
    assert np.all(np.diff(rows) > 0)


def test_palette_transparency_composited_on_white(bad_corpus):
    folder, _ = bad_corpus
    pal = Image.open(folder / "palette_alpha.png")
    assert pal.mode == "P" and pal.info.get("transparency") == 0
    index = np.asarray(pal)
    rgb = np.asarray(pal.convert("RGB"))
    transparent = index == 0
    assert transparent.any() and (~transparent).any()
    loaded = load_image(folder / "palette_alpha.png", 40)  # 40 px: no resize, so pixels compare 1:1
    assert np.all(loaded.pixels[transparent] == 255)
    assert np.array_equal(loaded.pixels[~transparent], rgb[~transparent])


def test_la_transparency_composited_on_white(bad_corpus):
    folder, _ = bad_corpus
    px = load_image(folder / "la.png", 40).pixels.astype(float)
    alpha = np.arange(40) * 6 / 255.0  # as written by the corpus: L = 90, alpha ramps over columns
    expect = 90 * alpha + 255 * (1 - alpha)
    assert np.allclose(px[..., 0], np.tile(expect, (40, 1)), atol=1.0)
    assert np.array_equal(px[..., 0], px[..., 2])
    assert px[:, 0].min() == 255  # fully transparent column is white, not black or the gray value


def test_cmyk_converted_to_similar_rgb(bad_corpus):
    folder, _ = bad_corpus
    px = load_image(folder / "cmyk.jpg", 40).pixels.astype(int)
    original = np.asarray(photo(40, 40, 3)).astype(int)
    assert np.abs(px - original).mean() < 12


def test_decompression_bomb_refused_quickly_with_guard_on(bad_corpus):
    folder, _ = bad_corpus
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and limit <= 200_000_000  # PIL's guard is on (importing ditpipe did not turn it off)
    start = time.perf_counter()
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(folder / "bomb.png", 24)
    assert time.perf_counter() - start < 10.0  # refused from the header; decoding 1.6 G pixels would take far longer
    assert Image.MAX_IMAGE_PIXELS == limit


def test_extreme_aspect_ratio_is_skipped(tmp_path):
    path = tmp_path / "strip.png"
    photo(600, 8, 0).save(path)
    with pytest.raises(BadImage, match="extreme aspect ratio 600x8"):
        load_image(path, 16)


def test_animation_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    loaded = load_image(path, 16)
    assert any("first frame" in n for n in loaded.notes)
    assert np.all(loaded.pixels[..., 0] > 200) and np.all(loaded.pixels[..., 2] < 50)


def test_16bit_rgb_png_is_scaled(tmp_path):
    """A 16-bit RGB PNG: PIL opens it as 8-bit RGB already; the result must still be the image, not noise."""
    ramp = np.linspace(0, 65535, 32).astype(">u2")
    rows = [b"\x00" + np.repeat(ramp, 3).astype(">u2").tobytes() for _ in range(32)]
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_chunks(32, 32, 16, 2, b"".join(rows)))
    px = load_image(path, 32).pixels.astype(float)
    cols = px[..., 0].mean(axis=0)
    assert cols[0] < 20 and cols[-1] > 235 and np.all(np.diff(cols) >= 0)


def test_missing_file_is_skipped_not_raised(tmp_path):
    with pytest.raises(BadImage, match="unreadable"):
        load_image(tmp_path / "gone.jpg", 16)


def test_sha256_is_of_the_source_bytes(tmp_path):
    """The sha256 covers the source bytes: two copies under other names hash the same; another image does not."""
    a, b, c = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    blob = jpeg_bytes(photo(50, 40, 1))
    a.write_bytes(blob)
    b.write_bytes(blob)
    c.write_bytes(jpeg_bytes(photo(50, 40, 2)))
    assert load_image(a, 16).sha256 == load_image(b, 16).sha256 != load_image(c, 16).sha256


# ---------------------------------------------------------------------------------------------------- pixel budget


def test_an_image_over_the_pixel_budget_is_refused_from_its_header(tmp_path):
    """A 16-bit 13,000 × 13,000 PNG header (169 MP, under PIL's own 179 MP bomb limit) over a garbage body: refused
    as over the budget, which proves nothing was decoded (decoding the body would fail as corrupt)."""
    path = tmp_path / "huge16.png"
    path.write_bytes(png_chunks(13000, 13000, 16, 0, b"\x00" * 64)[:-12] + b"garbage")
    assert 13000 * 13000 < 2 * Image.MAX_IMAGE_PIXELS  # PIL alone would try to decode it
    with pytest.raises(BadImage, match=r"over the pixel budget: 169,000,000 pixels > 40,000,000 \(data.max_pixels\)"):
        load_image(path, 32)
    assert DataConfig().max_pixels == 40_000_000
    with pytest.raises(BadImage, match="corrupt or truncated"):  # the control: with room, it would be decoded
        load_image(path, 32, max_pixels=200_000_000)


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(photo(64, 48)) + b"\0" * 5000)
    with pytest.raises(BadImage, match=r"file over the size cap: .* bytes > 4,000 \(data.max_file_bytes\)"):
        load_image(path, 16, max_file_bytes=4000)
    assert load_image(path, 16, max_file_bytes=1 << 20).pixels.shape == (16, 16, 3)


def test_a_16_bit_image_is_scaled_after_shrinking(tmp_path):
    """2048² 16-bit gray: scaling at full size made an 8-byte float per pixel (32 MiB); now the halvings come first, so
    the float array is the size of the halved image (< 4 × the target)."""
    import tracemalloc

    ramp = (np.arange(2048, dtype=np.float64)[:, None] * 32 + np.zeros(2048)).astype(">u2")  # rows 0 … 65504
    path = tmp_path / "gray16-2k.png"
    path.write_bytes(png_chunks(2048, 2048, 16, 0, b"".join(b"\x00" + r.tobytes() for r in ramp)))
    tracemalloc.start()
    try:
        loaded = load_image(path, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes traced"
    rows = loaded.pixels[..., 0].astype(float).mean(axis=1)
    assert "I;16 scaled to 8-bit" in loaded.notes[0] and rows[0] < 6 and rows[-1] > 249 and np.all(np.diff(rows) > 0)


def test_the_budget_skips_through_encode_with_the_reason_recorded(tmp_path, cli):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "small.jpg").write_bytes(jpeg_bytes(photo(30, 30)))
    (folder / "wide.jpg").write_bytes(jpeg_bytes(photo(60, 40)))
    code, _, err = cli("encode", "--dataset", "custom", "--data-path", folder, "--vae", "pixel", "--image-size", 16,
                       "--num-workers", 0, "--out", tmp_path / "s", "--data.max_pixels", 1000)
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_samples"] == 1
    assert [(s["file"], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [("wide.jpg",
                                                                                      "over the pixel budget")]
