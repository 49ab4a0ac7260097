"""Image sources: load_image for every kind, pixel digests, and images read from input files into records."""

import base64
import csv
import functools
import http.server
import io
import json
import random
import threading

import pytest
from PIL import Image

from simple_generation.errors import ImageError, InputError
from simple_generation.images import image_kind, is_image_source, load_image, looks_like_base64, pixel_digest
from simple_generation.io import InputRecord, output_record, prompt_text, read_records, scan
from simple_generation.io.records import parse_images, prompt_problem
from simple_generation.jobs import JobOptions, ListSource, images_key, run_job
from simple_generation.results import CompletionOutput, GenerationResult


def _noisy(size=(24, 16), seed=0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def picture():
    return _noisy()


@pytest.fixture
def png(picture):
    return _encoded(picture)


# ------------------------------------------------------------------------------------------- load_image
def test_every_local_source_kind_decodes_to_the_same_pixels(tmp_path, picture, png, monkeypatch):
    (tmp_path / "cat.png").write_bytes(png)
    monkeypatch.chdir(tmp_path)
    b64 = base64.b64encode(png).decode()
    sources = {
        "pil": picture,
        "path": str(tmp_path / "cat.png"),
        "relative path": "cat.png",
        "pathlike": tmp_path / "cat.png",
        "file url": (tmp_path / "cat.png").as_uri(),
        "bytes": png,
        "bytearray": bytearray(png),
        "data url": f"data:image/png;base64,{b64}",
        "base64": b64,
        "base64 with newlines": "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
        "datasets dict (bytes)": {"bytes": png, "path": "ignored.png"},
        "datasets dict (path)": {"bytes": None, "path": str(tmp_path / "cat.png")},
    }
    expected = pixel_digest(picture)
    for name, source in sources.items():
        assert is_image_source(source), name
        image = load_image(source)
        assert image.mode == "RGB" and image.size == picture.size, name
        assert pixel_digest(image) == expected, name


def test_images_come_back_unconverted():
    gray = Image.new("L", (5, 3), 7)
    rgba = Image.new("RGBA", (2, 2), (1, 2, 3, 4))
    assert load_image(_encoded(gray)).mode == "L"
    assert load_image(_encoded(rgba)).mode == "RGBA"
    palette = Image.new("P", (4, 4), 3)
    assert load_image(_encoded(palette, "GIF")).mode == "P"


def test_kinds_and_non_sources():
    assert image_kind("images/cat.png") == "path" and image_kind("https://example.com/a.png") == "remote"
    assert image_kind("data:image/png;base64,AAAA") == "data_url"
    assert image_kind("A" * 100) == "base64" and not looks_like_base64("short")
    assert not looks_like_base64("a" * 80 + ".png")  # a file name, however long
    for value in (3, 2.5, None, "", "   ", b"", {}, {"bytes": None, "path": None}, {"url": "x.png"}, [b"x"]):
        assert not is_image_source(value), value


def test_missing_file_names_it_and_where(tmp_path):
    with pytest.raises(ImageError, match=r"^texts\[3\], image 1: image file '.*nope\.png' not found"):
        load_image(str(tmp_path / "nope.png"), where="texts[3], image 1")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match="not found"):
        load_image({"bytes": None, "path": str(tmp_path / "nope.png")})


def test_not_an_image_corrupt_and_truncated(tmp_path, png):
    (tmp_path / "notes.png").write_text("hello, not an image")
    with pytest.raises(ImageError, match=r"^r:1: image file '.*notes\.png' is not an image"):
        load_image(str(tmp_path / "notes.png"), where="r:1")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"\x00" * 100)
    corrupt = png[:40] + bytes(len(png) - 40)  # a PNG header, then zeros: decoding fails
    with pytest.raises(ImageError, match="corrupt"):
        load_image(corrupt)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageError, match=r"cut\.png' cannot be decoded .*truncated"):
        load_image(str(tmp_path / "cut.png"))
    with pytest.raises(ImageError, match="base64 payload cannot be decoded"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="not an image source: int"):
        load_image(3, where="w")
    with pytest.raises(ImageError, match="image dict needs"):
        load_image({"url": "x"})
    assert issubclass(ImageError, InputError) and issubclass(ImageError, ValueError)


def test_remote_urls_are_refused_unless_allowed():
    with pytest.raises(ImageError, match=r"^p: .*remote images are off; pass allow_remote_images=True "
                                         r"\(CLI: --allow-remote-images\)"):
        load_image("https://example.com/cat.png", where="p")


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_url_allowed_against_a_local_server(http_root, picture, png):
    root, url = http_root
    (root / "cat.png").write_bytes(png)
    image = load_image(f"{url}/cat.png", allow_remote=True)
    assert pixel_digest(image) == pixel_digest(picture)
    with pytest.raises(ImageError, match=r"^w: fetching image URL .*/nope\.png failed: HTTP 404"):
        load_image(f"{url}/nope.png", allow_remote=True, where="w")


# ------------------------------------------------------------------------------------------- digests
def test_digest_is_of_the_decoded_pixels(picture, png):
    assert pixel_digest(load_image(png)) == pixel_digest(picture)
    jpeg = load_image(_encoded(picture, "JPEG", quality=90))
    assert jpeg.size == picture.size and jpeg.mode == picture.mode
    assert pixel_digest(jpeg) != pixel_digest(picture)  # lossy: other pixels
    assert pixel_digest(picture.convert("RGBA")) != pixel_digest(picture)  # the mode counts
    assert pixel_digest(_noisy(seed=1)) != pixel_digest(picture)
    red, blue = Image.new("P", (2, 2), 0), Image.new("P", (2, 2), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert pixel_digest(red) != pixel_digest(blue)  # same indices, other palettes


# ------------------------------------------------------------------------------------------- records
def _read(path, **kwargs):
    return list(read_records(path, **kwargs))


def test_jsonl_image_fields_resolve_against_the_file_folder(tmp_path, png, monkeypatch):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(png)
    b64 = base64.b64encode(png).decode()
    lines = [
        {"prompt": "one", "image": "img/a.png", "id": 1},
        {"prompt": "two",
         "images": ["img/a.png", "/abs/b.jpg", "https://example.com/c.png", f"data:image/png;base64,{b64}"]},
        {"prompt": "none", "image": None},
        {"prompt": "empty", "images": []},
        {"prompt": "base64 only", "image": b64},
    ]
    (data / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(tmp_path)  # relative to the file's folder, not the current one
    one, two, none, empty, only = _read("data/in.jsonl")
    assert one.images == [str(data / "img" / "a.png")] and one.fields == {"image": "img/a.png", "id": 1}
    assert pixel_digest(load_image(one.images[0])) == pixel_digest(load_image(png))
    assert two.images == [str(data / "img" / "a.png"), "/abs/b.jpg", "https://example.com/c.png",
                          f"data:image/png;base64,{b64}"]
    # carried: paths and URLs as given, None where the payload is not carried
    assert two.fields == {"images": ["img/a.png", "/abs/b.jpg", "https://example.com/c.png", None]}
    assert none.images is None and none.fields == {"image": None}
    assert empty.images is None and empty.fields == {"images": []}
    assert only.images == [b64] and only.fields == {}
    out = output_record(two, {"error": None})
    assert out["images"] == ["img/a.png", "/abs/b.jpg", "https://example.com/c.png", None]
    assert "image" not in output_record(only)
    json.dumps(output_record(only))


def test_stdin_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (record,) = read_records("-", stdin=io.BytesIO(b'{"prompt": "x", "image": "a/b.png"}\n'))
    assert record.images == [str(tmp_path / "a" / "b.png")]


def test_csv_image_and_images_columns(tmp_path):
    path = tmp_path / "in.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "images"])
        writer.writerow(["list", json.dumps(["a.png", "sub/b.png"])])
        writer.writerow(["single", "c.png"])
        writer.writerow(["empty", ""])
        writer.writerow(["bad", "[not json"])
    errors = []
    records = list(read_records(path, on_invalid=errors.append))
    assert [r.images for r in records] == [[str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")],
                                           [str(tmp_path / "c.png")], None]
    assert records[0].fields == {"images": ["a.png", "sub/b.png"]} and records[1].fields == {"images": "c.png"}
    assert len(errors) == 1 and str(errors[0]).startswith(f"{path}:5: record 3: field \"images\"")
    single = tmp_path / "one.csv"
    single.write_text("prompt,image\nx,pics/d.png\n")
    (record,) = _read(single)
    assert record.images == [str(tmp_path / "pics" / "d.png")] and record.fields == {"image": "pics/d.png"}


def test_parquet_with_a_datasets_style_image_column(tmp_path, png):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "prompt": ["embedded", "by path", "no image"],
        "image": pa.array([{"bytes": png, "path": "x.png"}, {"bytes": None, "path": "pics/y.png"}, None], struct),
        "raw": pa.array([png, None, None], pa.binary()),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    embedded, by_path, no_image = _read(tmp_path / "in.parquet")
    assert embedded.images == [{"bytes": png, "path": "x.png"}] and "image" not in embedded.fields
    assert pixel_digest(load_image(embedded.images[0])) == pixel_digest(load_image(png))
    assert by_path.images == [{"bytes": None, "path": str(tmp_path / "pics" / "y.png")}]
    assert no_image.images is None
    assert embedded.fields == {"raw": png}  # only the image fields are images: other columns are carried
    out = output_record(embedded)
    assert "image" not in out


def test_parquet_binary_image_column(tmp_path, png):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "image": pa.array([png], pa.binary())}), tmp_path / "b.parquet")
    (record,) = _read(tmp_path / "b.parquet")
    assert record.images == [png] and record.fields == {}


def test_datasets_image_feature_is_not_decoded(tmp_path, picture, png):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "cat.png").write_bytes(png)
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image(),
                                  "images": datasets.List(datasets.Image())})
    ds = datasets.Dataset.from_dict({"prompt": ["a"], "image": [str(tmp_path / "cat.png")], "images": [[]]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    (record,) = _read(tmp_path / "ds")
    (source,) = record.images
    assert isinstance(source, dict) and source["bytes"] == png  # save_to_disk embeds the file's bytes
    assert pixel_digest(load_image(source)) == pixel_digest(picture)
    assert "image" not in record.fields and record.fields == {"images": []}
    ds.to_parquet(str(tmp_path / "ds.parquet"))  # datasets' own parquet: the same {"bytes", "path"} structs
    (record,) = _read(tmp_path / "ds.parquet")
    assert pixel_digest(load_image(record.images[0])) == pixel_digest(picture) and record.fields == {"images": []}


def test_openai_batch_body_with_image_parts(tmp_path, png):
    b64 = base64.b64encode(png).decode()
    url = f"data:image/png;base64,{b64}"
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "max_tokens": 8, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                    {"type": "text", "text": " with "},
                    {"type": "image_url", "image_url": {"url": "pics/b.png"}},
                    {"type": "image", "image": "https://example.com/c.png"}]}]}}
    only_text = {"custom_id": "r2", "body": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}}
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(only_text) + "\n")
    first, second = _read(path)
    assert first.custom_id == "r1" and first.params == {"max_new_tokens": 8} and first.images is None
    assert first.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": url}, {"type": "text", "text": " with "},
        {"type": "image", "image": str(tmp_path / "pics" / "b.png")},
        {"type": "image", "image": "https://example.com/c.png"}]}]
    assert pixel_digest(load_image(first.prompt[1]["content"][1]["image"])) == pixel_digest(load_image(png))
    assert second.prompt == [{"role": "user", "content": "ab"}]  # text parts only: one string, as before
    assert prompt_text(first.prompt) == "system: Be brief.\nuser: Compare <image> with <image><image>"
    assert prompt_problem(first.prompt) is None
    shown = output_record(first)["prompt"][1]["content"]
    assert shown[1] == {"type": "image"} and shown[3]["image"] == str(tmp_path / "pics" / "b.png")
    assert first.prompt[1]["content"][1]["image"] == url  # the record itself keeps the source


def test_lone_surrogate_in_a_text_part_is_found():
    prompt = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "x\ud83d"}]}]
    assert "lone surrogate" in prompt_problem(prompt)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "image": 3}, r'field "image": int 3 is not an image'),
    ({"prompt": "x", "image": {"url": "a.png"}}, r'field "image": an image object needs a non-empty "bytes" or "path"'),
    ({"prompt": "x", "images": ["a.png", 7]}, r'field "images", image 1: int 7'),
    ({"prompt": "x", "images": ["a.png", None]}, r'field "images": image 1 is null'),
    ({"prompt": "x", "image": "a.png", "images": ["b.png"]}, 'both "image" and "images"'),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
     "an image_url part needs"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "only text and image content parts are supported"),
])
def test_a_bad_image_field_is_that_records_error(tmp_path, record, message):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(record) + "\n")
    errors = []
    records = list(read_records(path, on_invalid=errors.append))
    assert [r.prompt for r in records] == ["fine"]
    assert len(errors) == 1 and str(errors[0]).startswith(f"{path}:2: record 1: ")
    assert pytest.raises(InputError, _read, path).match(message)
    report = scan(path)
    assert report.records == 1 and report.error_count == 1


def test_missing_image_files_are_not_an_input_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "x", "image": "nope.png"}) + "\n")
    (record,) = _read(path)  # decoding is lazy: the generator finds it when its window runs
    assert record.images == [str(tmp_path / "nope.png")]


def test_scan_counts_the_same_prompt_with_other_images_as_distinct(tmp_path, png):
    path = tmp_path / "in.jsonl"
    lines = [{"prompt": "x", "image": "a.png"}, {"prompt": "x", "image": "b.png"}, {"prompt": "x", "image": "a.png"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert scan(path).duplicates == 1


def test_parse_images_directly():
    assert parse_images({"image": b"\x89PNG..."}, "w") == ([b"\x89PNG..."], {"image": None})
    assert parse_images({"image": None, "images": []}, "w") == (None, {})
    images, carried = parse_images({"images": ("a.png",)}, "w", base="/data")
    assert images == ["/data/a.png"] and carried == {"images": ["a.png"]}


# ------------------------------------------------------------------------------------------- the job layer
class _Recorder:
    """A generator stand-in for the job layer's plumbing: records what ``stream`` was given."""

    def __init__(self):
        self.calls = []
        self.last_run = None

    def stream(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        for index, prompt in enumerate(prompts):
            yield GenerationResult(index=index, prompt=prompt_text(prompt), prompt_tokens=1, completion_tokens=1,
                                   outputs=[CompletionOutput(index=0, text=f"answer {index}", finish_reason="length")])


class _Writer:
    def __init__(self):
        self.records = {}

    def add(self, index, record, **options):
        self.records[index] = record


def test_run_job_passes_images_only_when_a_record_has_some():
    with_images = [InputRecord(index=0, prompt="a", images=["/x/a.png"]), InputRecord(index=1, prompt="b")]
    generator, writer = _Recorder(), _Writer()
    run_job(generator, ListSource(with_images), writer, JobOptions(show_progress=False))
    ((prompts, kwargs),) = generator.calls
    assert prompts == ["a", "b"] and kwargs["images"] == [["/x/a.png"], None]
    generator = _Recorder()
    run_job(generator, ListSource(["a", "b"]), _Writer(), JobOptions(show_progress=False))
    assert "images" not in generator.calls[0][1]


def test_near_dedup_keeps_records_whose_images_differ():
    pytest.importorskip("datasketch")
    text = "Describe this picture in one long sentence, with every detail you can see in it."
    part = [{"role": "user", "content": [{"type": "image", "image": "/p/c.png"}, {"type": "text", "text": text}]}]
    records = [InputRecord(index=0, prompt=text, images=["/p/a.png"]),
               InputRecord(index=1, prompt=text, images=["/p/b.png"]),
               InputRecord(index=2, prompt=text, images=["/p/a.png"]),
               InputRecord(index=3, prompt=text),
               InputRecord(index=4, prompt=text),
               InputRecord(index=5, prompt=part)]
    generator, writer = _Recorder(), _Writer()
    summary = run_job(generator, ListSource(records), writer, JobOptions(near_dedup=0.9, show_progress=False))
    assert {i: r.get("duplicate_of") for i, r in writer.records.items() if r.get("duplicate_of") is not None} == \
        {2: 0, 4: 3}
    assert summary.near_duplicates == 2
    assert images_key(records[3]) == b"" and images_key(records[0]) == images_key(records[2]) != images_key(records[1])


def test_cli_allow_remote_images_flag():
    from simple_generation.cli import _generator_kwargs, build_parser

    parser = build_parser()
    run = parser.parse_args(["run", "some/model", "--prompt", "x", "--allow-remote-images"])
    assert _generator_kwargs(run)["allow_remote_images"] is True
    assert "allow_remote_images" not in _generator_kwargs(parser.parse_args(["run", "some/model", "--prompt", "x"]))
    chat = parser.parse_args(["chat", "some/model", "--allow-remote-images"])
    assert _generator_kwargs(chat)["allow_remote_images"] is True
    help_text = next(action for action in parser._subparsers._group_actions[0].choices["run"]._actions
                     if "--allow-remote-images" in action.option_strings).help
    assert "http(s)" in help_text
