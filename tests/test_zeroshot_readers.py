"""Every zero-shot reader on its fixture (counts, pairing, galleries, prompts), bad files named
with their line or record, and the pickle-based releases loaded without running their code."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import zeroshot_fixtures as fx

from umarvel.config import load_config
from umarvel.data.prompts import ZEROSHOT
from umarvel.errors import DataError
from umarvel.evaluation.zeroshot import TASKS


@pytest.fixture
def root(tmp_path):
    return tmp_path


def build(task, root):
    fx.WRITERS[task](root)
    return TASKS[task](root, None)


def test_registry_matches_prompt_table_and_paper():
    assert set(TASKS) == set(ZEROSHOT)
    assert TASKS["flickr"].paper == {"t2i_R@1": 85.4, "i2t_R@1": 93.3}
    assert TASKS["msrvtt"].paper["R@10"] == 80.2 and TASKS["msvd"].paper["R@1"] == 54.6
    assert TASKS["circo"].paper == {"mAP@5": 36.2}
    assert TASKS["mscoco"].paper == {}  # not in the paper's tables


def test_flickr_pairs_caption_i_with_image_i_div_5(root):
    flickr = build("flickr", root)
    t2i, i2t = flickr.retrievals()
    assert (len(t2i.queries), len(t2i.candidates)) == (15, 3)
    assert t2i.queries.ids == i2t.candidates.ids and i2t.queries.ids == t2i.candidates.ids
    assert [iid for _, _, iid in flickr.captions][5:10] == ["1"] * 5
    query = t2i.queries.items(7, 8)[0]
    assert query["text"] == "a green square, caption 2"
    assert query["instruction"] == ZEROSHOT["flickr"].instructions["t2i"]
    assert "instruction" not in i2t.candidates.items(0, 1)[0]  # candidates carry no instruction
    assert i2t.queries.items(2, 3)[0]["image"].endswith("flickr/images/2.png")
    assert flickr.prompt_overrides == {"compression_prompt": True}
    assert not flickr.is_real_data


def test_only_flickr_and_coco_use_the_compression_suffix():
    assert {name for name, p in ZEROSHOT.items() if p.compression} == {"flickr", "mscoco"}


def test_real_data_is_the_release_count(root, monkeypatch):
    fx.flickr(root, images=4)
    monkeypatch.setattr(TASKS["flickr"], "real_images", 4)
    assert TASKS["flickr"](root, None).is_real_data


@pytest.mark.parametrize("task,queries,candidates", [
    ("mscoco", 10, 2), ("sharegpt4v", 3, 3), ("urban1k", 3, 3), ("circo", 2, 6), ("visdial", 3, 3),
    ("fashioniq_multiturn", 2, 5), ("msrvtt", 2, 2), ("msvd", 4, 2)])
def test_reader_counts(root, task, queries, candidates):
    benchmark = build(task, root)
    first = benchmark.retrievals()[0]
    assert (len(first.queries), len(first.candidates)) == (queries, candidates)
    assert not benchmark.is_real_data
    items = first.queries.items(0, len(first.queries)) + first.candidates.items(0, len(first.candidates))
    assert all(pickle.loads(pickle.dumps(item)) == item for item in items)  # DataLoader workers get them


def test_urban1k_caption_is_the_first_line(root):
    urban = build("urban1k", root)
    assert urban.captions[0] == ("c1", "A city street, green light.", "1")


def test_circo_query_and_positives(root):
    circo = build("circo", root)
    (search,) = circo.retrievals()
    query = search.queries.items(0, 1)[0]
    assert query["text"] == "is green" and query["image"].endswith("000000000100.jpg")
    assert query["instruction"] == "I'm looking for a similar everyday image with the described changes."
    assert circo.queries[0][3] == {"101", "103"}
    assert search.k == 50


def test_genecis_galleries_are_per_query(root):
    genecis = build("genecis", root)
    searches = {s.name: s for s in genecis.retrievals()}
    assert list(searches) == list(genecis.TASKS)
    coco = searches["change_object"]
    assert coco.galleries["change_object:1"] == ["11", "12", "13"]  # target first, then its gallery
    vg = searches["focus_attribute"]
    assert vg.galleries["focus_attribute:0"] == ["600_0_1.jpg", "700_0_2.jpg", "800_0_3.jpg"]
    assert vg.queries.items(0, 1)[0]["instruction"] == "I'm looking for an image with the same attributes as described."
    assert all(set(g) <= set(s.candidates.ids) for s in searches.values() for g in s.galleries.values())


VISDIAL_ROUNDS = " ".join(["Q: is it red? A: no. Q: is it big? A: yes."] * 5)  # dialog 1 of the fixture


def test_visdial_text_is_the_rounds_only_by_default(root):
    visdial = build("visdial", root)
    search = visdial.retrievals()[0]
    assert search.queries.items(1, 2)[0]["text"] == VISDIAL_ROUNDS
    assert search.queries.name == "visdial-rounds"
    assert load_config(None).eval.zeroshot.visdial_caption is False


def test_visdial_caption_option_puts_the_caption_first(root):
    fx.WRITERS["visdial"](root)
    config = load_config(None, ["eval.zeroshot.visdial_caption=true"])
    search = TASKS["visdial"](root, config.eval.zeroshot).retrievals()[0]
    assert search.queries.items(1, 2)[0]["text"] == "a green square " + VISDIAL_ROUNDS
    assert search.queries.name == "visdial-caption-rounds"  # its own cache entry


def test_visdial_caption_does_not_shape_a_training_run():
    from umarvel.training.runs import config_fingerprint

    assert config_fingerprint(load_config(None)) == config_fingerprint(
        load_config(None, ["eval.zeroshot.visdial_caption=true"]))


def test_fashioniq_query_has_every_turn(root):
    fashion = build("fashioniq_multiturn", root)
    query = fashion.retrievals()[0].queries.items(0, 1)[0]
    assert [p.rsplit("/", 1)[1] for p in query["image"]] == ["B000.jpg", "B001.jpg"]
    assert query["text"] == "(1) is longer (2) is blue and has sleeves"
    assert fashion.queries[0][3] == "B002"


def test_multi_image_query_collates_every_image(root, tiny_model_dir):
    from umarvel.modeling.embedder import Embedder

    fashion = build("fashioniq_multiturn", root)
    query = fashion.retrievals()[0].queries.items(0, 1)[0]
    embedder = Embedder.from_pretrained(tiny_model_dir, device="cpu")
    batch = embedder.collate([query])
    assert batch["image_grid_thw"].shape[0] == 2
    start = embedder.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((batch["input_ids"][0] == start).sum()) == 2
    assert embedder.encode([query], convert_to_tensor=True).shape[0] == 1


def test_pairwise_galleries_hold_both_captions(root):
    ccneg = build("ccneg", root)
    (search,) = ccneg.retrievals()
    assert search.galleries["r0"] == ["r0:pos", "r0:neg"]
    texts = dict(zip(search.candidates.ids, (c["text"] for c in search.candidates.items(0, 6))))
    assert texts["r0:neg"] == "not a red square"  # commas dropped, as the official evaluation does
    sugar = build("sugar_crepe", root)
    assert [s.name for s in sugar.retrievals()] == list(sugar.SUBSETS)
    assert sugar.retrievals()[0].galleries["add_att:1"] == ["add_att:1:pos", "add_att:1:neg"]


def test_ccneg_test_split_is_the_last_rows(root, monkeypatch):
    monkeypatch.setattr(TASKS["ccneg"], "TEST_ROWS", 2)
    ccneg = build("ccneg", root)
    assert [e[0] for e in ccneg.examples] == ["r1", "r2"]
    assert ccneg.is_real_data  # more rows than the test split, and the split is full


def test_msvd_every_caption_is_a_query(root):
    msvd = build("msvd", root)
    assert [c[1:] for c in msvd.captions[:2]] == [("a man runs", "clip0_0_5"), ("someone is running 0", "clip0_0_5")]
    video = msvd.retrievals()[0].candidates.items(0, 1)[0]["video"]
    assert video["frames"] == 12
    msrvtt = build("msrvtt", root)
    assert msrvtt.retrievals()[0].candidates.items(0, 1)[0]["video"] == {
        "path": str(root / "msrvtt" / "videos" / "video7000.mp4"), "fps": 2.0, "min_frames": 4}


# ---- bad files --------------------------------------------------------------------------------

def test_bad_json_named_with_line(root):
    fx.flickr(root)
    path = root / "flickr" / "flickr_text.json"
    path.write_text('[\n"a",\n"b"\n"c"]')
    with pytest.raises(DataError, match=r"flickr_text.json:4: not valid JSON"):
        TASKS["flickr"](root, None)


def test_wrong_caption_count_and_missing_image(root):
    fx.flickr(root)
    path = root / "flickr" / "flickr_text.json"
    path.write_text(json.dumps(["x"] * 7))
    with pytest.raises(DataError, match="flickr_text.json: 7 captions is not five per image"):
        TASKS["flickr"](root, None)
    fx.flickr(root)
    (root / "flickr" / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"flickr_text.json: record 5: image .*1.png does not exist"):
        TASKS["flickr"](root, None)


def test_missing_key_named_with_record(root):
    fx.sharegpt4v(root)
    path = root / "sharegpt4v" / "datas_for_validation.json"
    records = json.loads(path.read_text())
    del records[1]["caption"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"datas_for_validation.json: record 1: missing \(field 'caption'\)"):
        TASKS["sharegpt4v"](root, None)


def test_circo_unknown_image_id(root):
    fx.circo(root)
    path = root / "circo" / "annotations" / "val.json"
    records = json.loads(path.read_text())
    records[1]["gt_img_ids"] = [999]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"val.json: record 1: image id 999 is not in image_info_unlabeled2017.json"):
        TASKS["circo"](root, None)


def test_csv_errors_name_the_line(root):
    fx.msrvtt(root)
    path = root / "msrvtt" / "annotations" / "MSRVTT_JSFUSION_test.csv"
    path.write_text(path.read_text() + "ret9,msr9,video9999,a missing clip\n")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:4: video .*video9999.mp4 does not exist"):
        TASKS["msrvtt"](root, None)
    path.write_text("video_id,caption\nvideo7000,x\n")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:1: header has no column 'sentence'"):
        TASKS["msrvtt"](root, None)


def test_msvd_list_line_without_captions(root):
    fx.msvd(root)
    (root / "MSVD" / "test_list.txt").write_text("clip0_0_5\nnope\n")
    with pytest.raises(DataError, match=r"test_list.txt:2: video nope has no captions in raw-captions.pkl"):
        TASKS["msvd"](root, None)


def test_urban1k_gap_and_visdial_bad_index(root):
    fx.urban1k(root)
    (root / "Urban1k" / "image" / "2.jpg").unlink()
    with pytest.raises(DataError, match="2.jpg is missing"):
        TASKS["urban1k"](root, None)
    fx.visdial(root)
    path = root / "visdial" / "visdial_1.0_val.json"
    data = json.loads(path.read_text())
    data["data"]["dialogs"][2]["dialog"][3]["question"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"record dialogs\[2\].dialog\[3\]: question 7"):
        TASKS["visdial"](root, None)


# ---- pickles ----------------------------------------------------------------------------------

class _Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_ccneg_malicious_pickle_refused(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = fx.ccneg_data(root)
    data["annotations"][0]["json"]["caption"] = _Exploit()
    torch.save(data, root / "ccneg" / "ccneg_preprocessed.pt")
    with pytest.raises(DataError, match=r"ccneg_preprocessed.pt: refused"):
        TASKS["ccneg"](root, None)
    assert not (tmp_path / "PWNED").exists()


def test_ccneg_tensors_only_file_loads(root):
    data = fx.ccneg_data(root)
    data["embedding_cache"] = torch.zeros(3, 4)  # tensors are fine next to plain containers
    torch.save(data, root / "ccneg" / "ccneg_preprocessed.pt")
    ccneg = TASKS["ccneg"](root, None)
    assert len(ccneg.examples) == 3 and ccneg.examples[0][2] == "a red square"


def test_msvd_malicious_pickle_refused(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fx.msvd(root)
    (root / "MSVD" / "raw-captions.pkl").write_bytes(pickle.dumps({"clip0_0_5": _Exploit()}))
    with pytest.raises(DataError, match=r"raw-captions.pkl: refused: the pickle asks for global (posix|os|nt).system"):
        TASKS["msvd"](root, None)
    assert not (tmp_path / "PWNED").exists()


def test_wrong_type_and_top_level_named(root):
    fx.circo(root)
    path = root / "circo" / "annotations" / "image_info_unlabeled2017.json"
    path.write_text(json.dumps({"pictures": []}))
    with pytest.raises(DataError, match=r"image_info_unlabeled2017.json: missing \(field 'images'\)"):
        TASKS["circo"](root, None)
    fx.sugar_crepe(root)
    path = root / "sugar-crepe" / "data" / "swap_obj.json"
    path.write_text(json.dumps({"7": {"filename": "000000000000.jpg", "caption": 3, "negative_caption": "x"}}))
    with pytest.raises(DataError, match=r"swap_obj.json: record 7: expected str, got int \(field 'caption'\)"):
        TASKS["sugar_crepe"](root, None)


def test_duplicate_query_id_named(root):
    fx.circo(root)
    path = root / "circo" / "annotations" / "val.json"
    records = json.loads(path.read_text())
    records[1]["id"] = 0
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"val.json: record 1: id 0 repeats record 0$"):
        TASKS["circo"](root, None)


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model_dir):
    from umarvel.modeling.embedder import Embedder

    return Embedder.from_pretrained(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("task", sorted(fx.WRITERS))
def test_every_task_item_embeds(tmp_path, task, tiny_embedder):
    """Each search's first queries and candidates go through the collator into unit vectors."""
    benchmark = build(task, tmp_path)
    for search in benchmark.retrievals()[:2]:
        items = search.queries.items(0, 2) + search.candidates.items(0, 2)
        vectors = tiny_embedder.encode(items, convert_to_tensor=True)
        assert vectors.shape == (len(items), 64)
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
