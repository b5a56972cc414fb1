"""The runtime refuses anything but a complete, unaltered model folder, in one line naming the problem."""

from __future__ import annotations

import json

import pytest

from dialogpt_edge.runtime import ModelFolderError, load


def test_valid_folder_loads(tiny_model):
    spec = load(tiny_model)
    assert (spec.n_layer, spec.n_head, spec.head_dim, spec.eos_token_id) == (2, 4, 16, 50256)


def refusal(folder) -> str:
    with pytest.raises(ModelFolderError) as info:
        load(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "does not exist" in refusal(tmp_path / "nope")


def test_a_hub_id_is_told_to_be_exported_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    message = refusal("microsoft/DialoGPT-small")
    assert "does not exist" in message
    assert "export it first: `dialogpt-edge export microsoft/DialoGPT-small --output DIR`" in message
    assert "Hugging Face" not in refusal("./nope")


def test_a_checkpoint_folder_is_told_to_be_exported(tiny_checkpoint):
    message = refusal(tiny_checkpoint)
    assert f"looks like a checkpoint: export it with `dialogpt-edge export {tiny_checkpoint} --output DIR`" in message


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    assert "is a file; a model is a folder" in refusal(tmp_path / "model.onnx")


def test_missing_manifest(model_copy):
    (model_copy / "manifest.json").unlink()
    assert "manifest.json is missing" in refusal(model_copy)


def test_missing_model_file(model_copy):
    (model_copy / "model.onnx").unlink()
    message = refusal(model_copy)
    assert "model.onnx" in message and "missing" in message


def test_altered_file_same_size(model_copy):
    path = model_copy / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = refusal(model_copy)
    assert "tokenizer.json" in message and "sha256" in message


def test_truncated_file(model_copy):
    path = model_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    message = refusal(model_copy)
    assert "model.onnx" in message and "bytes" in message


def test_manifest_not_json(model_copy):
    (model_copy / "manifest.json").write_text("{not json")
    assert "not valid JSON" in refusal(model_copy)


def test_unknown_format_version(model_copy):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    assert "format_version 99" in refusal(model_copy)


def test_a_folder_from_before_the_token_table_moved_out_of_the_graph_is_told_to_re_export(model_copy):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 2  # its graph took input_ids and read the embedding itself
    path.write_text(json.dumps(manifest))
    message = refusal(model_copy)
    assert "format_version 2, this runtime reads 3" in message and "re-export the model" in message


@pytest.mark.parametrize("change, named", [
    (lambda m: m.pop("token_embedding"), "'token_embedding' is missing"),
    (lambda m: m["token_embedding"].update(bits=16), "has bits 16; this runtime reads 32, 8 or 4"),
    (lambda m: m["token_embedding"].update(bits=32.0), "has bits 32.0; this runtime reads 32, 8 or 4"),
    (lambda m: m["token_embedding"]["rows"].update(offset=m["files"]["model.onnx.data"]["bytes"] - 4096), "rows do not fit the model"),
    (lambda m: m["token_embedding"]["rows"].update(bytes=m["token_embedding"]["rows"]["bytes"] // 2), "rows do not fit the model"),
    (lambda m: m["token_embedding"]["rows"].pop("offset"), "needs an integer offset and bytes for its rows"),
    (lambda m: m["token_embedding"].update(file="weights.bin"), "names 'weights.bin', which is not one of the folder's files"),
])
def test_a_token_table_that_does_not_fit_the_model_is_named(model_copy, change, named):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    message = refusal(model_copy)
    assert named in message and "re-export the model" in message


@pytest.mark.parametrize("fixture", ["tiny_int8", "tiny_int4"])
def test_a_quantized_token_tables_block_size_and_scales_are_checked(request, tmp_path, fixture):
    import shutil

    folder = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "m")
    path = folder / "manifest.json"
    good = json.loads(path.read_text())
    for change, named in [(dict(block_size=0), "has block_size 0"), (dict(block_size="64"), "has block_size '64'"),
                          (dict(scales=None), "needs an integer offset and bytes for its scales"),
                          (dict(block_size=good["token_embedding"]["block_size"] * 2), "rows do not fit the model")]:
        manifest = json.loads(json.dumps(good))
        manifest["token_embedding"].update(change)
        path.write_text(json.dumps(manifest))
        message = refusal(folder)
        assert named in message, (change, message)


def test_manifest_without_architecture(model_copy):
    path = model_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["architecture"]["n_head"]
    path.write_text(json.dumps(manifest))
    assert "n_head" in refusal(model_copy)


def test_a_cache_type_this_runtime_cannot_hold_is_named(tiny_int8, monkeypatch):
    # as a runtime from before the int8 cache would meet today's default export
    from dialogpt_edge.runtime import session

    monkeypatch.setattr(session, "_ORT_TO_NUMPY", {"tensor(float)": float, "tensor(float16)": float})
    with pytest.raises(ModelFolderError) as info:
        session.Session(load(tiny_int8))
    message = str(info.value)
    assert "keeps its KV cache as tensor(int8)" in message and "upgrade dialogpt-edge" in message
    assert "\n" not in message


def test_a_tokenizer_that_no_longer_parses_is_reported_as_altered(model_copy):
    """open_with_tokenizer() reads tokenizer.json before the checksum pass; a broken one is still named as altered."""
    from dialogpt_edge.runtime import open_with_tokenizer

    session, tokenizer = open_with_tokenizer(model_copy, threads=1)
    assert tokenizer.decode(tokenizer.encode("Hello there")) == "Hello there" and session.spec.n_layer == 2
    path = model_copy / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[0:1] = b"]"  # same size, no longer JSON
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError) as info:
        open_with_tokenizer(model_copy, threads=1)
    assert "tokenizer.json" in str(info.value) and "sha256" in str(info.value)


def test_a_data_file_cut_short_while_in_use_is_named(model_copy):
    import numpy as np

    from dialogpt_edge.runtime.embedding import TokenEmbedding

    spec = load(model_copy)
    table = TokenEmbedding(model_copy, spec.token_table, spec.n_embd)
    data = model_copy / spec.token_table.file
    with open(data, "r+b") as f:
        f.truncate(spec.token_table.rows_offset + 100)
    with pytest.raises(ModelFolderError) as info:
        table.rows(np.array([spec.vocab_size - 1]))
    assert "ended before the token table did" in str(info.value) and str(data) in str(info.value)
