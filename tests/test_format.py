import numpy as np
import pytest

from kit.augment import leave_one_out, task_rng
from kit.format import IGNORE, FormatError, GridFormat, sequence_tokens
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


class SplittingTokenizer:
    """A tokenizer whose digits are not single tokens: the format must refuse it."""

    eos_token_id, bos_token_id = 0, None

    def encode(self, text, add_special_tokens=False):
        return [1, 2] if text.isdigit() else [3]


def test_a_tokenizer_with_multi_token_digits_is_refused():
    with pytest.raises(FormatError, match="'0' encodes to 2 tokens"):
        GridFormat.from_tokenizer(SplittingTokenizer(), "fake")
