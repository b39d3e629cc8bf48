"""The backend on a tiny random Llama (both implementations), and a smoke test on the real default model.

Exactness checks run with fp32 compute, so that batched and one-at-a-time results agree to the bit where the
maths says they must; the bf16-autocast path is checked against the fp32 reference to a tolerance.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kit.backend import Backend, LoraSettings, load_backend
from kit.decode import generate, greedy
from kit.format import IGNORE
from kit.weights import ensure_default_model, offline_environment

# The peft cases import transformers before the unsloth cases import unsloth; on CPU unsloth patches nothing
# that matters here, so its import-order warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:WARNING. Unsloth should be imported before")

SYMBOLS = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", "\n", "I", "O", *"abcdefghijklmnop"]
EOS = SYMBOLS.index("</s>")
DIGITS = [SYMBOLS.index(d) for d in "0123456789"]
GRID_VOCAB = [*DIGITS, SYMBOLS.index("\n"), EOS]


def save_tiny_llama(path: Path, tied: bool = True) -> Path:
    """A 2-layer random Llama with a one-token-per-character tokenizer, saved like a real model."""
    offline_environment()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(SYMBOLS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return save_char_tokenizer(path)


def save_char_tokenizer(path: Path) -> Path:
    """A one-token-per-character tokenizer over SYMBOLS, saved beside a model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def unsloth_skip_reason() -> str | None:
    offline_environment()
    try:
        importlib.import_module("unsloth")
        return None
    except Exception as error:  # noqa: BLE001 -- any failure to import is a reason to skip, reported as such
        return f"unsloth does not import here: {type(error).__name__}: {error}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", params=["peft", "unsloth"])
def backend(request, tiny_dir) -> Backend:
    """Both implementations, fp32 compute; every test resets the adapter it uses."""
    if request.param == "unsloth" and (reason := unsloth_skip_reason()):
        pytest.skip(reason)
    return load_backend(tiny_dir, kind=request.param, lora=LoraSettings(rank=4, alpha=8), max_length=128,
                        seed=0, log=lambda _: None, dtype=torch.float32)


def random_rows(rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    return [rng.choice(GRID_VOCAB[:-1], size=n).astype(np.int64) for n in lengths]


def right_padded(rows: list[np.ndarray], answer_from: list[int]) -> tuple[torch.Tensor, ...]:
    """ids, labels (loss only from each row's answer_from on), mask; pads carry junk to prove they are ignored."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 7, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, answer_from)):
        ids[i, :len(row)] = torch.from_numpy(row)
        labels[i, start:len(row)] = torch.from_numpy(row[start:])
        mask[i, :len(row)] = 1
    return ids, labels, mask


def reference_log_probs(backend: Backend, ids: torch.Tensor, mask: torch.Tensor,
                        vocab: list[int] | None) -> torch.Tensor:
    """Log-softmax of a plain fp32 forward of the whole PEFT model (full logits), next-token aligned."""
    with torch.no_grad():
        logits = backend.model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    if vocab is not None:
        logits = logits[..., vocab]
    return logits.log_softmax(-1)


def train_steps(backend: Backend, steps: int, rng: np.random.Generator) -> None:
    rows = random_rows(rng, [20, 15])
    ids, labels, mask = right_padded(rows, [10, 8])
    optimizer = torch.optim.Adam(backend.trainable_parameters(), lr=1e-2)
    backend.train()
    for _ in range(steps):
        backend.loss(ids, labels, mask, GRID_VOCAB).backward()
        optimizer.step()
        optimizer.zero_grad()
    backend.eval()


def pair_scores(backend: Backend, prompts: list[np.ndarray], answers: list[np.ndarray],
                vocab: list[int] | None) -> np.ndarray:
    """Each answer scored after its own prompt."""
    return backend.score(backend.prefill(prompts), range(len(prompts)), answers, vocab)


def test_reset_gives_a_fresh_adapter_and_training_leaves_the_base_alone(backend: Backend) -> None:
    rng = np.random.default_rng(1)
    prompts, answers = random_rows(rng, [12, 9]), random_rows(rng, [5, 7])
    base = {n: p.detach().clone() for n, p in backend.model.named_parameters() if "lora_" not in n}
    with backend.model.disable_adapter():
        base_scores = pair_scores(backend, prompts, answers, None)

    backend.reset_lora(7)
    fresh = [p.detach().clone() for p in backend.trainable_parameters()]
    fresh_scores = pair_scores(backend, prompts, answers, None)
    fresh_tokens = generate(backend, prompts, GRID_VOCAB, EOS, 6)
    np.testing.assert_allclose(fresh_scores, base_scores, rtol=1e-6)  # B = 0: the adapter is a no-op

    train_steps(backend, 5, rng)
    assert not np.allclose(pair_scores(backend, prompts, answers, None), fresh_scores)
    assert all(torch.equal(p, base[n]) for n, p in backend.model.named_parameters() if "lora_" not in n)

    backend.reset_lora(7)
    assert all(torch.equal(p, q) for p, q in zip(backend.trainable_parameters(), fresh))
    assert all(p.grad is None for p in backend.trainable_parameters())
    np.testing.assert_array_equal(pair_scores(backend, prompts, answers, None), fresh_scores)
    for got, want in zip(generate(backend, prompts, GRID_VOCAB, EOS, 6), fresh_tokens):
        np.testing.assert_array_equal(got, want)

    backend.reset_lora(8)
    assert not torch.equal(backend.trainable_parameters()[0], fresh[0])


def test_trainable_parameters_are_exactly_the_lora_weights(backend: Backend) -> None:
    lora = {id(p) for n, p in backend.model.named_parameters() if "lora_" in n}
    assert {id(p) for p in backend.trainable_parameters()} == lora
    assert {id(p) for p in backend.model.parameters() if p.requires_grad} == lora


@pytest.mark.parametrize("vocab", [None, GRID_VOCAB])
def test_loss_matches_a_plain_forward_over_labelled_positions(backend: Backend, vocab: list[int] | None) -> None:
    backend.reset_lora(3)
    train_steps(backend, 2, np.random.default_rng(2))  # a non-zero adapter, so the LoRA path counts too
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(3), [18, 11, 14]), [9, 4, 14])
    targets = labels.masked_fill(mask == 0, IGNORE)[:, 1:]
    if vocab is not None:
        targets = targets.apply_(lambda t: t if t == IGNORE else vocab.index(t))
    log_probs = reference_log_probs(backend, ids, mask, vocab)
    expected = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)

    with torch.no_grad():
        got = backend.loss(ids, labels, mask, None if vocab is None else torch.tensor(vocab))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    junk = labels.clone()
    junk[mask == 0] = DIGITS[3]  # labels of pads are not labels
    padded_ids = ids.masked_fill(mask == 0, DIGITS[5])  # nor do pad tokens reach real ones (causal)
    with torch.no_grad():
        torch.testing.assert_close(backend.loss(padded_ids, junk, mask, vocab), got, rtol=1e-6, atol=1e-6)


def test_loss_under_bf16_autocast_stays_close_to_fp32(backend: Backend, monkeypatch) -> None:
    backend.reset_lora(4)
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(4), [16, 12]), [6, 6])
    with torch.no_grad():
        exact = backend.loss(ids, labels, mask, GRID_VOCAB)
        monkeypatch.setattr(backend, "dtype", torch.bfloat16)
        rounded = backend.loss(ids, labels, mask, GRID_VOCAB)
    torch.testing.assert_close(rounded, exact, rtol=2e-2, atol=2e-2)


def test_loss_gradients_reach_only_the_adapter(backend: Backend) -> None:
    backend.reset_lora(5)
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(5), [10, 10]), [5, 5])
    backend.train()
    backend.loss(ids, labels, mask, GRID_VOCAB).backward()
    backend.eval()
    assert all(p.grad is not None for p in backend.trainable_parameters())
    assert any(p.grad.abs().sum() > 0 for p in backend.trainable_parameters())
    assert all(p.grad is None for n, p in backend.model.named_parameters() if "lora_" not in n)
    backend.reset_lora(5)


def test_checkpointing_switches_recomputation_on_and_off(backend: Backend) -> None:
    """The memory plan's switch really changes the training pass: a checkpointed layer runs its projections again
    in the backward pass, an unchecked one does not (and the gradients are the same either way)."""
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(7), [12, 9]), [4, 3])
    calls = []
    hook = backend._decoder.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    grads = {}
    try:
        for on in (True, False, True):
            backend.reset_lora(7)
            backend.set_checkpointing(on)
            backend.train()
            calls.clear()
            backend.loss(ids, labels, mask, GRID_VOCAB).backward()
            assert len(calls) == (2 if on else 1), f"checkpointing {on}: q_proj ran {len(calls)} times"
            grads[on] = [p.grad.clone() for p in backend.trainable_parameters()]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[True], grads[False]))
    finally:
        hook.remove()
        backend.set_checkpointing(False)
        backend.eval()
        backend.reset_lora(7)


def test_loss_refuses_left_padding_and_foreign_labels(backend: Backend) -> None:
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(6), [8, 5]), [2, 2])
    with pytest.raises(ValueError, match="right-padded"):
        backend.loss(ids, labels, mask.flip(1), None)
    labels[0, 4] = SYMBOLS.index("a")
    with pytest.raises(ValueError, match="not in the restricted vocabulary"):
        backend.loss(ids, labels, mask, GRID_VOCAB)


def test_generate_stays_in_vocab_respects_limits_and_batches_exactly(backend: Backend) -> None:
    backend.reset_lora(0)
    prompts = random_rows(np.random.default_rng(7), [5, 13, 9, 1])
    vocab = [*DIGITS[:4], EOS]
    batched = generate(backend, prompts, vocab, EOS, 10)
    for prompt, got in zip(prompts, batched):
        assert got.dtype == np.int64 and 1 <= len(got) <= 10 and set(got.tolist()) <= set(vocab)
        assert EOS not in got[:-1].tolist() and (len(got) == 10 or got[-1] == EOS)
        np.testing.assert_array_equal(generate(backend, [prompt], vocab, EOS, 10)[0], got)


def test_generate_stops_each_row_at_its_first_eos_or_where_given_up_on(backend: Backend) -> None:
    backend.reset_lora(0)
    prompts = random_rows(np.random.default_rng(8), [6, 11])
    free = generate(backend, prompts, GRID_VOCAB, EOS, 12)
    stop = int(free[0][len(free[0]) // 2])  # a token row 0 does emit: declare it the EOS
    stopped = generate(backend, prompts, GRID_VOCAB, stop, 12)
    for row, got in zip(free, stopped):
        cut = np.flatnonzero(row == stop)
        np.testing.assert_array_equal(got, row[: cut[0] + 1] if len(cut) else row)
    assert len(generate(backend, prompts, [EOS], EOS, 12)[0]) == 1

    with pytest.raises(ValueError, match="not in the decoding vocabulary"):
        generate(backend, prompts, DIGITS, EOS, 4)

    prompts = random_rows(np.random.default_rng(22), [6, 11, 8])  # uneven prompts; rows leave at different steps
    free = generate(backend, prompts, GRID_VOCAB, EOS, 12)
    assert all(EOS not in row[:5] for row in free)
    seen = []

    def give_up_on_rows_0_and_2(tokens: np.ndarray) -> np.ndarray:
        seen.append(tokens.copy())
        return np.array([len(seen) >= 3, False, len(seen) >= 5])

    cut = generate(backend, prompts, GRID_VOCAB, EOS, 12, give_up=give_up_on_rows_0_and_2)
    for got, want in zip(cut, [free[0][:3], free[1], free[2][:5]]):  # given up on: ends there, without EOS
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.stack(seen)[:, 1], cut[1][:len(seen)])


def test_cache_rows_copies_the_rows_asked_for_in_either_cache_form() -> None:
    from kit.backend.cache import cache_rows

    keys_values = [(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)) for _ in range(2)]
    rows = torch.tensor([2, 0, 2])
    for legacy in (False, True):
        cache = cache_rows(keys_values, rows, legacy)
        layers = cache if legacy else [(layer.keys, layer.values) for layer in cache.layers]
        for (keys, values), (want_keys, want_values) in zip(layers, keys_values):
            assert torch.equal(keys, want_keys[rows]) and torch.equal(values, want_values[rows])
        whole = cache_rows(keys_values, legacy=legacy)
        first = whole[0][0] if legacy else whole.layers[0].keys
        assert torch.equal(first, keys_values[0][0]) and first.data_ptr() != keys_values[0][0].data_ptr()


@pytest.mark.parametrize("vocab", [None, GRID_VOCAB])
def test_score_is_the_summed_log_prob_of_a_plain_forward(backend: Backend, vocab: list[int] | None) -> None:
    """Prompts of different lengths prefilled in one right-padded pass, then answers of different lengths after
    any of them in another: each answer gets the log-prob a plain forward of its prompt + answer gives it, and the
    prefix serves any number of passes."""
    backend.reset_lora(2)
    train_steps(backend, 2, np.random.default_rng(9))
    rng = np.random.default_rng(10)
    prompts, answers = random_rows(rng, [7, 12]), random_rows(rng, [4, 1, 9, 6])
    rows = [0, 1, 1, 0]
    prefix = backend.prefill(prompts)
    got = backend.score(prefix, rows, answers, vocab)
    assert got.dtype == np.float64 and got.shape == (4,)
    for row, answer, value in zip(rows, answers, got):
        ids = torch.from_numpy(np.concatenate([prompts[row], answer]))[None]
        log_probs = reference_log_probs(backend, ids, torch.ones_like(ids), vocab)[0, len(prompts[row]) - 1:]
        targets = torch.tensor(answer if vocab is None else [vocab.index(t) for t in answer])
        expected = log_probs.gather(1, targets[:, None]).sum().item()
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)
    greedy(backend, prefix, GRID_VOCAB, EOS, 5)  # decoding leaves the prefix as it found it
    np.testing.assert_allclose(backend.score(prefix, rows[::-1], answers[::-1], vocab), got[::-1], rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds max_length"):
        backend.score(prefix, [1], [np.zeros(backend.max_length - 11, np.int64)], vocab)


@pytest.mark.slow
def test_real_default_model_generates_and_scores() -> None:
    """The shipped model end to end on a tiny real prompt (built from the GGUF once, then cached)."""
    backend = load_backend(ensure_default_model(), kind="auto", max_length=512, log=lambda _: None)
    tokenizer = backend.tokenizer
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    newline, eos = tokenizer.encode("\n", add_special_tokens=False)[0], tokenizer.eos_token_id
    vocab = [*digits, newline, eos]
    prompt = tokenizer.encode("I\n12\n34\nO\n21\n43\n", add_special_tokens=False) + [eos]
    prompt = np.array(prompt + tokenizer.encode("I\n56\n78\nO\n", add_special_tokens=False), dtype=np.int64)
    [out] = generate(backend, [prompt], vocab, eos, 8)
    assert 1 <= len(out) <= 8 and set(out.tolist()) <= set(vocab)
    answer = np.array(tokenizer.encode("65\n87\n", add_special_tokens=False) + [eos], dtype=np.int64)
    scores = backend.score(backend.prefill([prompt]), [0, 0], [answer, out], vocab)
    assert np.isfinite(scores).all() and (scores < 0).all()


@pytest.mark.slow
def test_compiled_training_matches_eager_without_recompiling(tiny_dir) -> None:
    """The compiled training pass gives the eager loss and gradients; other lengths and batch sizes reuse its
    graph, and one-row batches, scoring and decoding run eagerly instead of compiling anew."""
    backend = load_backend(tiny_dir, kind="peft", lora=LoraSettings(rank=4, alpha=8), max_length=128, seed=0,
                           log=lambda _: None, dtype=torch.float32)
    train_steps(backend, 2, np.random.default_rng(11))  # a non-zero adapter
    batches = [right_padded(random_rows(np.random.default_rng(12), lengths), [3] * len(lengths))
               for lengths in ([18, 11, 14], [40, 33], [9])]
    prompts = random_rows(np.random.default_rng(13), [7, 12])

    def losses_and_grads() -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        backend.train()
        out = []
        for ids, labels, mask in batches:
            loss = backend.loss(ids, labels, mask, GRID_VOCAB)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in backend.trainable_parameters()]))
            for p in backend.trainable_parameters():
                p.grad = None
        backend.eval()
        return out

    eager, eager_scores = losses_and_grads(), pair_scores(backend, prompts, prompts, GRID_VOCAB)
    eager_tokens = generate(backend, prompts, GRID_VOCAB, EOS, 6)
    assert backend.compile_training() > 0 and backend.compiled
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = losses_and_grads()
        np.testing.assert_allclose(pair_scores(backend, prompts, prompts, GRID_VOCAB), eager_scores, rtol=1e-6)
        for got, want in zip(generate(backend, prompts, GRID_VOCAB, EOS, 6), eager_tokens):
            np.testing.assert_array_equal(got, want)
    for (loss, grads), (want_loss, want_grads) in zip(compiled, eager):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.cpu_only
def test_long_passes_switch_to_sdpa_with_the_same_maths(backend: Backend, monkeypatch) -> None:
    """On a CPU, passes from `sdpa_from` tokens run torch's flash kernel instead of eager attention: same loss,
    gradients and scores, and decoding switches back to its own kernel."""
    backend.reset_lora(6)
    train_steps(backend, 2, np.random.default_rng(14))  # a non-zero adapter
    ids, labels, mask = right_padded(random_rows(np.random.default_rng(15), [20, 15]), [4, 4])
    kernel = backend.model.get_base_model().config

    def loss_and_grads(sdpa_from: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(backend, "sdpa_from", sdpa_from)
        backend.train()
        loss = backend.loss(ids, labels, mask, GRID_VOCAB)
        loss.backward()
        grads = [p.grad.clone() for p in backend.trainable_parameters()]
        for p in backend.trainable_parameters():
            p.grad = None
        return loss.detach(), grads

    assert backend.attention_for(19) == "eager" and backend.sdpa_from == 512  # the CPU default
    eager = loss_and_grads(10**6)
    assert kernel._attn_implementation == "eager"
    flash = loss_and_grads(16)
    assert kernel._attn_implementation == "sdpa"
    assert backend.attention_for(16) == "sdpa" and backend.attention_for(15) == "eager"
    torch.testing.assert_close(flash[0], eager[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(flash[1], eager[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    prompts, answers = random_rows(np.random.default_rng(16), [18, 13]), random_rows(np.random.default_rng(19), [3, 5])
    monkeypatch.setattr(backend, "sdpa_from", 10**6)
    eager_scores = pair_scores(backend, prompts, answers, GRID_VOCAB)
    monkeypatch.setattr(backend, "sdpa_from", 16)  # the prompts' prefill runs sdpa, the answers' pass grouped
    np.testing.assert_allclose(pair_scores(backend, prompts, answers, GRID_VOCAB), eager_scores, rtol=1e-5)
    generate(backend, prompts, GRID_VOCAB, EOS, 2)
    assert kernel._attn_implementation == backend.decode_attention == "eager_grouped"


@pytest.mark.cpu_only
def test_grouped_eager_decoding_and_scoring_match_transformers_eager(backend: Backend, monkeypatch) -> None:
    """On a CPU, decoding and scoring read the grouped KV cache in place (kit.attention): the tokens and scores
    of transformers' eager attention, which copies each key/value head per query head (tiny Llama: 2 per head)."""
    backend.reset_lora(9)
    train_steps(backend, 2, np.random.default_rng(20))
    rng = np.random.default_rng(21)
    prompts, answers = random_rows(rng, [11, 6, 15]), random_rows(rng, [4, 7, 2])
    assert backend.decode_attention == "eager_grouped"
    grouped = generate(backend, prompts, GRID_VOCAB, EOS, 8), pair_scores(backend, prompts, answers, GRID_VOCAB)
    monkeypatch.setattr(backend, "decode_attention", "eager")
    eager = generate(backend, prompts, GRID_VOCAB, EOS, 8), pair_scores(backend, prompts, answers, GRID_VOCAB)
    for got, want in zip(grouped[0], eager[0]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(grouped[1], eager[1], rtol=1e-5)


def test_grouped_attention_is_used_only_where_it_reproduces_the_models_own() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from kit import attention

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    assert attention.reproduces(LlamaForCausalLM(LlamaConfig(**small)))
    assert not attention.reproduces(Gemma2ForCausalLM(Gemma2Config(**small)))  # soft-capped scores


def test_merged_adapter_infers_the_same_and_gives_the_base_back_untouched(backend: Backend) -> None:
    """Inference on merged weights: the same scores and tokens as base + LoRA branch; afterwards the very same
    base tensors, unchanged, and the branch live again. An untrained adapter swaps nothing."""
    weights = {n: p for n, p in backend.model.named_parameters() if "lora_" not in n}
    values = {n: p.detach().clone() for n, p in weights.items()}
    rng = np.random.default_rng(17)
    prompts, answers = random_rows(rng, [9, 14]), random_rows(rng, [5, 3])

    backend.reset_lora(1)
    with backend.merged_adapter():
        assert all(p is weights[n] for n, p in backend.model.named_parameters() if "lora_" not in n)

    train_steps(backend, 3, np.random.default_rng(18))
    scores, tokens = pair_scores(backend, prompts, answers, GRID_VOCAB), generate(backend, prompts, GRID_VOCAB, EOS, 6)
    with backend.merged_adapter():
        swapped = [n for n, p in backend.model.named_parameters() if "lora_" not in n and p is not weights[n]]
        assert swapped and all("proj" in n for n in swapped)
        np.testing.assert_allclose(pair_scores(backend, prompts, answers, GRID_VOCAB), scores, rtol=1e-5, atol=1e-5)
        for got, want in zip(generate(backend, prompts, GRID_VOCAB, EOS, 6), tokens):
            np.testing.assert_array_equal(got, want)
    for n, p in backend.model.named_parameters():
        if "lora_" not in n:
            assert p is weights[n] and torch.equal(p, values[n])
    np.testing.assert_array_equal(pair_scores(backend, prompts, answers, GRID_VOCAB), scores)


@pytest.mark.parametrize("tied", [True, False])
def test_trained_token_rows_reach_the_kits_head_and_a_merged_model(tmp_path, tied: bool) -> None:
    """Pretuning's --train-embeddings: the grid tokens' rows of the embedding and of the head (one set where they
    are tied) train with the LoRA; the kit's own head reads the trained rows, not the weight it found at load, so
    its loss is the model's; the merged model computes the same; a reset gives the base's rows back; and inference
    refuses merged weights (they would drop the rows)."""
    from transformers import AutoModelForCausalLM

    from kit.weights import merge_adapter

    base = save_tiny_llama(tmp_path / "base", tied=tied)
    backend = load_backend(base, "auto", LoraSettings(rank=4, alpha=8, trainable_tokens=tuple(GRID_VOCAB)),
                           max_length=128, seed=0, log=lambda _: None, dtype=torch.float32)
    assert backend.name == "peft"  # "auto" takes peft: unsloth trains no token rows
    rows = [p for n, p in backend.model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(rows) == (1 if tied else 2) and {id(p) for p in rows} <= {id(p) for p in backend.trainable_parameters()}
    assert all(r.shape == (len(GRID_VOCAB), 64) and r.dtype == torch.float32 for r in rows)
    start = [r.detach().clone() for r in rows]
    train_steps(backend, 3, np.random.default_rng(30))
    assert all(not torch.equal(r, s) for r, s in zip(rows, start))  # embedding and head rows both learn

    ids, labels, mask = right_padded(random_rows(np.random.default_rng(31), [18, 12]), [6, 5])
    targets = labels.masked_fill(mask == 0, IGNORE)[:, 1:]
    log_probs = reference_log_probs(backend, ids, mask, None)  # peft's own forward, trained rows in place
    expected = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    with torch.no_grad():
        torch.testing.assert_close(backend.loss(ids, labels, mask), expected, rtol=1e-5, atol=1e-5)
        grid = torch.tensor(GRID_VOCAB)
        restricted = backend.loss(ids, labels, mask, grid)
    with pytest.raises(ValueError, match="token rows"):
        with backend.merged_adapter():
            pass

    backend.model.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    torch.testing.assert_close(logits.log_softmax(-1), log_probs, rtol=1e-5, atol=1e-5)

    backend.reset_lora(0)
    assert all(torch.equal(r, s) for r, s in zip(rows, start)) and all(r.grad is None for r in rows)
    plain = load_backend(base, "peft", LoraSettings(rank=4, alpha=8), max_length=128, seed=0, log=lambda _: None,
                         dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(backend.loss(ids, labels, mask, grid), plain.loss(ids, labels, mask, grid))
        assert not torch.allclose(restricted, plain.loss(ids, labels, mask, grid))
