"""Tests for trainers.text around the encoders: prompt files (plain, CSV/TSV, the shipped and shared class lists),
the encoded-feature cache (keys, hits, rewrites, damaged files), the paper preset's text choices and the import
footprint of trainers.text. The encoders themselves (MiniLM, OpenCLIP, specs): tests/unit/test_text.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, with_choices

from trainers import text
from trainers.configs import TDSMConfig
from trainers.errors import InputError
from trainers.prompts import read_prompt_file
from trainers.tdsm_task import encode_class_texts, prompt_files
from trainers.text import TextFeatures, encode_prompt_sets, features_sha256, text_cache_key, text_cache_path

ASSETS = Path(text.__file__).resolve().parent / "assets"
PROMPTS = ["drink water", "kick a ball", "put on a hat/cap"]


# ---------------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------------


def test_read_plain_prompt_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("  drink water \neat meal/snack\n\n\n", encoding="utf-8")
    assert read_prompt_file(path, expected_count=2) == ["drink water", "eat meal/snack"]


def test_read_csv_and_tsv_prompt_files(tmp_path):
    (tmp_path / "a.csv").write_text("idx,label\n1,drink water\n2,\"eat meal, snack\"\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("label_index0\tcode\tname\n0\tA001\tdrink water\n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "a.csv") == ["drink water", "eat meal, snack"]
    assert read_prompt_file(tmp_path / "b.tsv") == ["drink water"]


def test_prompt_file_errors(tmp_path):
    (tmp_path / "gap.txt").write_text("drink water\n\neat meal\n", encoding="utf-8")
    (tmp_path / "cols.csv").write_text("idx,text\n1,drink water\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("drink water\neat meal\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"gap\.txt:2: empty line"):
        read_prompt_file(tmp_path / "gap.txt")
    with pytest.raises(InputError, match="no 'label' or 'name' column"):
        read_prompt_file(tmp_path / "cols.csv")
    with pytest.raises(InputError, match=r"two\.txt: 2 prompts, expected 3 \(one per class\)"):
        read_prompt_file(tmp_path / "two.txt", expected_count=3)
    with pytest.raises(InputError, match=r"missing\.txt: prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_first_rows_of_a_longer_prompt_file(tmp_path):
    # A 120-row headed CSV and a 120-line file, as NTU-120's class list and descriptions.
    path = tmp_path / "ntu120.csv"
    path.write_text("idx,label\n" + "".join(f"{i + 1},action {i}\n" for i in range(120)), encoding="utf-8")
    (tmp_path / "llm.txt").write_text("".join(f"text {i}\n" for i in range(120)), encoding="utf-8")
    assert read_prompt_file(path, first=60) == [f"action {i}" for i in range(60)]
    assert read_prompt_file(tmp_path / "llm.txt", expected_count=60, first=60)[-1] == "text 59"
    assert read_prompt_file(path, first=120) == read_prompt_file(path)
    with pytest.raises(InputError) as err:
        read_prompt_file(path, first=121)
    assert str(err.value) == f"{path}: 120 prompts, fewer than the first 121 asked for (text.num_classes)"
    with pytest.raises(InputError, match="must be >= 1"):
        read_prompt_file(path, first=0)


def test_ntu60_reads_the_first_60_rows_of_the_ntu120_prompts(tmp_path):
    (tmp_path / "n.csv").write_text("idx,label\n" + "".join(f"{i},a{i}\n" for i in range(120)), encoding="utf-8")
    (tmp_path / "d.txt").write_text("".join(f"d{i}\n" for i in range(119)), encoding="utf-8")
    cfg = TDSMConfig.model_validate({"text": {"class_names": tmp_path / "n.csv", "descriptions": [tmp_path / "d.txt"],
                                              "num_classes": 60, "cache_dir": tmp_path / "cache"}})
    assert prompt_files(cfg) == [tmp_path / "n.csv", tmp_path / "d.txt"]
    names, feats = encode_class_texts(cfg)
    assert names == [f"a{i}" for i in range(60)] and feats.global_feats.shape[0] == 60
    with pytest.raises(InputError, match="fewer than the first 121"):
        encode_class_texts(cfg.model_copy(update={"text": cfg.text.model_copy(update={"num_classes": 121})}))
    with pytest.raises(ValueError, match="num_classes"):
        TDSMConfig.model_validate({"text": {"num_classes": 0}})


# The six classes whose `label` differs between SA-DVAE's ntu60.csv and the first 60 rows of ntu120.csv (0-based);
# the official TDSM code reads ntu120.csv for NTU-60 too, so the named NTU-60 splits do the same.
NTU60_CSV_DIFFERS = [5, 25, 26, 34, 47, 55]


def test_ntu60_csv_differs_from_the_ntu120_prompts_in_six_classes():
    lists = SHARED_DATA / "zsl" / "sa-dvae" / "class_lists"
    if not (lists / "ntu120.csv").is_file() or not (lists / "ntu60.csv").is_file():
        pytest.skip(f"{lists} not available")
    ntu60 = read_prompt_file(lists / "ntu60.csv", expected_count=60)
    first60 = read_prompt_file(lists / "ntu120.csv", first=60)
    assert [c for c in range(60) if ntu60[c] != first60[c]] == NTU60_CSV_DIFFERS
    assert first60[26] == "bend knees slightly then spring quickly off the ground"
    assert ntu60[26] == "bend knees slightly then spring then fall down"
    llm = read_prompt_file(lists / "ntu120_llm.txt", expected_count=120)
    assert read_prompt_file(lists / "ntu120_llm.txt", first=60) == llm[:60]
    if (lists / "ntu60_llm.txt").is_file():
        assert read_prompt_file(lists / "ntu60_llm.txt", expected_count=60) == llm[:60]


@pytest.mark.parametrize(
    "relative, count, first",
    [
        ("zsl/sa-dvae/class_lists/ntu60.csv", 60, "fist and move the hand up to the head then look up"),
        ("class_names/ntu120_official_names.tsv", 120, "drink water"),
    ],
)
def test_read_shared_class_lists(relative, count, first):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not available")
    prompts = read_prompt_file(path, expected_count=count)
    assert prompts[0] == first


def test_ntu60_assets_have_one_prompt_per_class():
    names = read_prompt_file(ASSETS / "ntu60_class_names.txt", expected_count=60)
    descriptions = read_prompt_file(ASSETS / "ntu60_descriptions.txt", expected_count=60)
    assert names[0] == "drink water" and names[58] == "walking towards each other"
    assert all(10 <= len(d.split()) <= 35 for d in descriptions)
    official = SHARED_DATA / "class_names" / "ntu120_official_names.tsv"
    if official.is_file():
        assert names == read_prompt_file(official)[:60]


# ---------------------------------------------------------------------------------------------------------------
# Cached encoding
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted_builds(monkeypatch, minilm):
    """Replace build_text_encoder by one that records each spec it builds (MiniLM is reused, not reloaded)."""
    built: list[str] = []
    real_build = text.build_text_encoder

    def build(spec, device="cpu", layer="last", pooled="projected"):
        built.append(spec)
        if spec == "minilm":
            return with_choices(minilm, layer, pooled)
        return real_build(spec, device=device, layer=layer, pooled=pooled)

    monkeypatch.setattr(text, "build_text_encoder", build)
    return built


def test_cache_hit_builds_no_encoder(tmp_path, counted_builds, monkeypatch):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    first = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    assert first.global_feats.shape == (3, 2 * 384) and first.local_feats.shape == (3, 12, 2 * 384)
    assert counted_builds == ["minilm"]

    def refuse(spec, **kwargs):
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr(text, "build_text_encoder", refuse)
    second = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    torch.testing.assert_close(second.global_feats, first.global_feats, rtol=0, atol=0)
    torch.testing.assert_close(second.local_feats, first.local_feats, rtol=0, atol=0)
    key = text_cache_key("minilm:all-MiniLM-L6-v2", sets, 12, layer="last", pooled="projected")
    assert list(tmp_path.iterdir()) == [text_cache_path(tmp_path, key)]  # one file, no temp leftovers


def test_cache_concatenates_sets_in_order(tmp_path, counted_builds, minilm):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    feats = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    second_set = minilm.encode(sets[1], 12)
    torch.testing.assert_close(feats.global_feats[:, 384:], second_set.global_feats)
    torch.testing.assert_close(feats.local_feats[..., 384:], second_set.local_feats)


def test_cache_key_changes_with_every_input():
    def key(identity="minilm:all-MiniLM-L6-v2", sets=(PROMPTS,), max_tokens=35, layer="last", pooled="projected"):
        return text_cache_key(identity, sets, max_tokens, layer=layer, pooled=pooled)

    base = key()
    assert base == key(sets=[list(PROMPTS)])
    assert base != key(sets=[PROMPTS[:2] + ["put on a hat"]])
    assert base != key(max_tokens=34)
    assert base != key(identity="open_clip:ViT-B-32:random-seed0")
    assert base != key(sets=[PROMPTS, PROMPTS])
    assert len({base, key(layer="penultimate"), key(pooled="eot"), key(layer="penultimate", pooled="eot")}) == 4
    # Sets are not merged: moving a prompt from one set to the next is a different input.
    assert key("e", [["a", "b"], ["c"]], 3) != key("e", [["a"], ["b", "c"]], 3)


def test_cache_misses_when_prompts_tokens_or_encoder_change(tmp_path, counted_builds):
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS[:2] + ["put on a cap"]], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=13, cache_dir=tmp_path)
    other = encode_prompt_sets("open_clip:ViT-S-32-alt:none", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert other.global_feats.shape == (3, 256)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)  # still cached
    assert counted_builds == ["minilm", "minilm", "minilm", "open_clip:ViT-S-32-alt:none"]
    assert len(list(tmp_path.glob("text-*.pt"))) == 4


def test_truncated_or_mismatched_cache_file_is_rewritten(tmp_path, counted_builds):
    first = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    torch.testing.assert_close(again.global_feats, first.global_feats)
    assert counted_builds == ["minilm", "minilm"]

    blob = torch.load(path, weights_only=True)  # rewritten: loads again, then gets the wrong shape
    blob["local_feats"] = blob["local_feats"][:, :5]
    torch.save(blob, path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm", "minilm"]


def test_cache_misses_when_layer_or_pooling_change(tmp_path, counted_builds):
    default = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    paper = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path, layer="penultimate",
                               pooled="eot")
    assert counted_builds == ["minilm", "minilm"] and len(list(tmp_path.glob("text-*.pt"))) == 2
    assert not torch.allclose(default.global_feats, paper.global_feats, atol=1e-3)
    blob = torch.load(next(iter(sorted(tmp_path.glob("text-*.pt")))), weights_only=True)
    assert blob["sha256"] == features_sha256(TextFeatures(blob["global_feats"], blob["local_feats"]))


@pytest.mark.parametrize("damage", ["nan", "tampered", "no_hash"])
def test_cache_with_nan_or_tampered_tensors_is_rebuilt_never_used(tmp_path, counted_builds, caplog, damage):
    first = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    blob = torch.load(path, weights_only=True)
    if damage == "nan":
        # Re-hashed, as a buggy writer would: the finiteness check must catch it on its own.
        blob["local_feats"][1, 3, 7] = float("nan")
        blob["sha256"] = features_sha256(TextFeatures(blob["global_feats"], blob["local_feats"]))
    elif damage == "tampered":
        blob["global_feats"][0, 0] += 1e-3  # finite and well-shaped, but not what was written
    else:
        del blob["sha256"]
    torch.save(blob, path)
    again = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm"]  # rebuilt, not read
    assert "ignoring unusable text-feature cache" in caplog.text
    torch.testing.assert_close(again.global_feats, first.global_feats, rtol=0, atol=0)
    torch.testing.assert_close(again.local_feats, first.local_feats, rtol=0, atol=0)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm"]  # the rewritten file is good again


def test_non_finite_fresh_features_are_an_input_error_naming_encoder_file_and_prompt(tmp_path, monkeypatch, minilm):
    class NaNEncoder:
        identity = "minilm:all-MiniLM-L6-v2"

        def encode(self, prompts, max_tokens):
            feats = minilm.encode(prompts, max_tokens)
            feats.local_feats[2, 0, 0] = float("nan")
            return feats

    monkeypatch.setattr(text, "build_text_encoder", lambda spec, **kwargs: NaNEncoder())
    with pytest.raises(InputError) as info:
        encode_prompt_sets("minilm", [PROMPTS, PROMPTS], max_tokens=12, cache_dir=tmp_path,
                           set_names=["names.txt", "descriptions.txt"])
    message = str(info.value)
    assert message.startswith("minilm:all-MiniLM-L6-v2 on names.txt: non-finite text features for prompt 2 ")
    assert "'put on a hat/cap'" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing cached


def test_paper_preset_selects_the_papers_text_features():
    from trainers.config import build_config, load_yaml
    from trainers.configs import TDSMConfig

    preset = Path(text.__file__).resolve().parents[1] / "service" / "configs" / "tdsm_paper.yaml"
    cfg = build_config(TDSMConfig, load_yaml(preset))
    assert (cfg.text.layer, cfg.text.pooled, cfg.text.max_tokens) == ("penultimate", "eot", 35)
    assert (TDSMConfig().text.layer, TDSMConfig().text.pooled) == ("last", "projected")  # defaults unchanged


def test_crash_while_writing_leaves_no_cache_file(tmp_path, counted_builds, monkeypatch):
    def crash(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"half a file")
        else:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(text.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_encode_prompt_sets_validates_inputs(tmp_path):
    with pytest.raises(InputError, match=r"equal size.*\[3, 2\]"):
        encode_prompt_sets("minilm", [PROMPTS, PROMPTS[:2]], max_tokens=12, cache_dir=tmp_path)
    with pytest.raises(InputError, match="equal size"):
        encode_prompt_sets("minilm", [], max_tokens=12, cache_dir=tmp_path)
    with pytest.raises(InputError, match="max_tokens"):
        encode_prompt_sets("minilm", [PROMPTS], max_tokens=0, cache_dir=tmp_path)
    with pytest.raises(InputError, match="not understood"):
        encode_prompt_sets("clip", [PROMPTS], max_tokens=12, cache_dir=tmp_path)


def test_importing_trainers_text_pulls_in_no_ray_mlflow_or_model_libraries():
    import subprocess
    import sys

    code = (
        "import sys, trainers.text; "
        "bad = [m for m in ('ray', 'mlflow', 'open_clip', 'transformers') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert result.returncode == 0, result.stderr
