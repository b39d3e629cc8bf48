import itertools

import numpy as np
import pytest

from kit.augment import leave_one_out, task_rng
from kit.format import IGNORE, FormatError, GridFormat, GridWatch, sequence_tokens
from kit.tasks import Pair


@pytest.fixture(scope="module")
def fmt(smollm2_tokenizer) -> GridFormat:
    return GridFormat.from_tokenizer(smollm2_tokenizer, "smollm2")


def test_smollm2_symbols_are_single_distinct_tokens(fmt, smollm2_tokenizer):
    assert smollm2_tokenizer.decode(list(fmt.digit_ids)) == "0123456789"
    assert smollm2_tokenizer.decode([fmt.row_end_id]) == "\n"
    assert fmt.eos_id != fmt.bos_id


def test_every_arc1_eval_task_round_trips(fmt, arc1_eval, smollm2_tokenizer):
    """Each leave-one-out example of each task: ids match the counted length, the label mask covers exactly
    the answer, the answer parses back to the query output, and the text decodes as the layout says."""
    for task in arc1_eval.tasks:
        for ex in leave_one_out(task, task_rng(0, task.id), len(task.train)):
            ids, labels = fmt.encode_example(ex.demos, ex.query)
            assert len(ids) == sequence_tokens(ex.demos, ex.query.input, ex.query.output.shape)
            answer = ids[labels != IGNORE]
            assert (labels[labels != IGNORE] == answer).all()
            assert len(answer) == ex.query.output.size + ex.query.output.shape[0] + 1
            assert (ids[-len(answer):] == answer).all()
            assert (fmt.parse_grid(answer) == ex.query.output).all()
        prompt = fmt.encode_prompt(task.train, task.test_inputs[0])
        assert len(prompt) == sequence_tokens(task.train, task.test_inputs[0])
    text = smollm2_tokenizer.decode(fmt.encode_prompt(task.train[:1], task.test_inputs[0])[1:])
    rows = "\n".join("".join(map(str, r)) for r in task.train[0].input.tolist())
    assert text.startswith("I" + rows + "\nO")


@pytest.mark.parametrize("body,reason", [
    ([1, 2, "\n"], "no EOS"),
    ([1, 2, "\n", 3, "EOS"], "complete row"),
    (["EOS"], "complete row"),
    ([1, 2, "\n", 3, "\n", "EOS"], "ragged"),
    ([1, "\n", "\n", "EOS"], "empty row"),
    ([1, "I", "\n", "EOS"], "not a digit"),
    ([1] * 31 + ["\n", "EOS"], "exceeds 30x30"),
])
def test_malformed_output_is_rejected(fmt, body, reason):
    symbol = {"\n": fmt.row_end_id, "EOS": fmt.eos_id, "I": fmt.input_id}
    ids = [symbol[t] if isinstance(t, str) else fmt.digit_ids[t] for t in body]
    with pytest.raises(FormatError, match=reason):
        fmt.parse_grid(ids)


def test_parse_stops_at_the_first_eos(fmt):
    grid = np.array([[1, 2], [3, 4]], np.uint8)
    ids = list(fmt.encode_answer(grid)) + [fmt.digit_ids[5], fmt.input_id]
    assert (fmt.parse_grid(ids) == grid).all()


def test_only_the_query_output_carries_loss(fmt):
    demo = Pair(np.ones((2, 2), np.uint8), np.zeros((1, 1), np.uint8))
    query = Pair(np.full((1, 3), 7, np.uint8), np.full((2, 1), 8, np.uint8))
    ids, labels = fmt.encode_example([demo], query)
    learned = labels[labels != IGNORE]
    assert learned.tolist() == [fmt.digit_ids[8], fmt.row_end_id, fmt.digit_ids[8], fmt.row_end_id, fmt.eos_id]
    assert (labels[:-len(learned)] == IGNORE).all()


@pytest.mark.parametrize("loss_on", ["query", "outputs", "all-outputs"])
def test_the_outputs_loss_masks_exactly_the_demonstration_outputs(fmt, loss_on):
    """Ids never change with loss_on; labels are the ids exactly on the outputs it names (rows and EOS), IGNORE
    everywhere else: markers, inputs, BOS."""
    demos = [Pair(np.ones((2, 2), np.uint8), np.zeros((1, 1), np.uint8)),
             Pair(np.full((1, 2), 3, np.uint8), np.full((2, 2), 4, np.uint8))]
    query = Pair(np.full((1, 3), 7, np.uint8), np.full((2, 1), 8, np.uint8))
    ids, labels = fmt.encode_example(demos, query, loss_on)
    assert np.array_equal(ids, np.concatenate([fmt.encode_prompt(demos, query.input), fmt.encode_answer(query.output)]))
    outputs = [fmt.encode_answer(p.output) for p in (*demos, query)]
    learned = {"query": [2], "outputs": [1, 2], "all-outputs": [0, 1, 2]}[loss_on]
    expected = np.full(len(ids), IGNORE)
    ends = np.flatnonzero(ids == fmt.eos_id)  # each output ends at its EOS, in order
    for i in learned:
        expected[ends[i] - len(outputs[i]) + 1:ends[i] + 1] = outputs[i]
    assert np.array_equal(labels, expected)
    with pytest.raises(ValueError, match="loss_on"):
        fmt.encode_example(demos, query, "inputs")


def sentencepiece_tokenizer(pieces: list[str]):
    """A Llama-2-like tokenizer: a dummy-prefix "▁" before the text, pieces of one character, byte fallback
    for what has no piece (the newline as "<0x0A>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(["<unk>", "<s>", "</s>", "▁", "<0x0A>", *pieces, "▁5"])}
    core = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_tokenizer_with_a_dummy_prefix_gives_its_bare_tokens():
    tokenizer = sentencepiece_tokenizer([*"0123456789IO"])
    assert tokenizer.encode("5", add_special_tokens=False) == [3, tokenizer.convert_tokens_to_ids("5")]
    fmt = GridFormat.from_tokenizer(tokenizer, "spm")
    assert tokenizer.convert_ids_to_tokens(list(fmt.digit_ids)) == list("0123456789")  # not "▁5"
    assert tokenizer.convert_ids_to_tokens([fmt.row_end_id, fmt.input_id, fmt.output_id]) == ["<0x0A>", "I", "O"]


def test_a_tokenizer_without_the_symbols_is_refused_in_one_line_naming_them():
    with pytest.raises(FormatError, match=r"^models/spm: the tokenizer has no single token for '3', '7', 'O';"):
        GridFormat.from_tokenizer(sentencepiece_tokenizer([*"01245689I"]), "models/spm")


def parses_within(fmt: GridFormat, ids: list[int], max_side: int) -> bool:
    try:
        return max(fmt.parse_grid(ids).shape) <= max_side
    except FormatError:
        return False


def test_grid_watch_never_flags_an_answer_that_parses(fmt):
    """Every sequence of 8 tokens over two digits, the row end and EOS, read by the watch in one batch: no
    sequence that parses as a grid of sides <= 3 is flagged before its EOS (flagging one would lose a valid
    answer), while most of the others are (each doomed kind at its token: the next test)."""
    alphabet = [fmt.digit_ids[0], fmt.digit_ids[1], fmt.row_end_id, fmt.eos_id]
    sequences = np.array(list(itertools.product(alphabet, repeat=8)))
    watch = GridWatch(fmt, len(sequences), max_side=3)
    flagged = np.stack([watch.step(column) for column in sequences.T], axis=1)
    parsed = np.array([parses_within(fmt, list(row), 3) for row in sequences])
    eos_at = np.argmax(sequences == fmt.eos_id, axis=1)
    assert parsed.sum() > 100
    assert not any(flagged[i, :eos_at[i] + 1].any() for i in np.flatnonzero(parsed))
    assert flagged[~parsed, -1].mean() > 0.8
    once_flagged = np.maximum.accumulate(flagged, axis=1)
    assert (flagged == once_flagged).all()  # doomed stays doomed


@pytest.mark.parametrize("body, flagged_at", [
    ([1, 2, "\n", 3, "\n"], 4),  # ragged: the second row ends short
    ([1, 2, "\n", 3, 4, 5], 5),  # a row longer than the first
    ([1, "\n", "\n"], 2),  # empty row
    ([1, 2, "EOS"], 2),  # EOS inside a row
    ([1, "\n"] * 4, 7),  # a fourth row
    ([1, 2, 3, 4], 3),  # a first row longer than the side
    ([1, 2, 3, "\n", 4, 5, 6, "\n", "EOS"], None),
])
def test_grid_watch_flags_a_doomed_answer_at_the_token_that_dooms_it(fmt, body, flagged_at):
    symbol = {"\n": fmt.row_end_id, "EOS": fmt.eos_id}
    ids = [symbol[t] if isinstance(t, str) else fmt.digit_ids[t] for t in body]
    watch = GridWatch(fmt, 1, max_side=3)
    flags = [bool(watch.step(np.array([t]))[0]) for t in ids]
    assert flags.index(True) == flagged_at if flagged_at is not None else not any(flags)
