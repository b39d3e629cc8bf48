"""Task <-> token ids, in a compact grid format that needs no tokenizer at encode time.

One token per cell (the digit), one per row end (newline), a marker before each input ("I") and each
output ("O"), EOS after each output:

    [BOS] I <in rows> O <out rows> EOS ... I <query in rows> O | <query out rows> EOS

Everything left of `|` is the prompt; the model learns (and later generates) the rest. Works with any
tokenizer in which each symbol is a single token (checked at load time), including the shrunk vocabulary
of a packed model. Token counts come from grid shapes alone, so the planner never tokenises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kit.grids import MAX_SIDE, NUM_COLOURS, Grid
from kit.tasks import Pair, Task

IGNORE = -100  # label of a token that carries no loss (the convention of HF causal LMs)
DIGITS = tuple(str(d) for d in range(NUM_COLOURS))
ROW_END, INPUT_MARK, OUTPUT_MARK = "\n", "I", "O"


class FormatError(ValueError):
    """A tokenizer cannot express the format, or generated ids are not a valid grid."""


def grid_tokens(shape: tuple[int, int]) -> int:
    """Tokens of one grid: a cell each, plus a row end per row."""
    height, width = shape
    return height * (width + 1)


def pair_tokens(pair: Pair) -> int:
    """Tokens of a demonstration: two markers, two grids, EOS."""
    return 3 + grid_tokens(pair.input.shape) + grid_tokens(pair.output.shape)


def sequence_tokens(demos: Sequence[Pair], query_input: Grid, output_shape: tuple[int, int] | None = None,
                    bos: bool = True) -> int:
    """Length of the encoded sequence from shapes alone: the prompt, plus the output and EOS when given."""
    prompt = int(bos) + sum(pair_tokens(p) for p in demos) + 2 + grid_tokens(query_input.shape)
    return prompt + (grid_tokens(output_shape) + 1 if output_shape is not None else 0)


def task_tokens(task: Task) -> int:
    """Tokens of the task's longest test sequence (all demonstrations, the test input, and the true output when
    known): the size measure used to plan and to pick small tasks."""
    outputs = task.test_outputs or [None] * len(task.test_inputs)
    return max(sequence_tokens(task.train, grid, None if out is None else out.shape)
               for grid, out in zip(task.test_inputs, outputs))


def answer_budget(side: int) -> int:
    """Tokens reserved for an answer whose sides are at most `side`, in any orientation (rows + EOS)."""
    return grid_tokens((side, side)) + 1


def demos_that_fit(demos: Sequence[Pair], query_input: Grid, answer_tokens: int, max_tokens: int,
              bos: bool = True) -> list[Pair] | None:
    """The demonstrations that fit with the query and an answer of `answer_tokens` in `max_tokens`: the longest
    are dropped first, order kept. None when the query alone does not fit."""
    kept = list(demos)
    base = sequence_tokens([], query_input, bos=bos) + answer_tokens
    total = base + sum(pair_tokens(p) for p in kept)
    while total > max_tokens and kept:
        longest = max(range(len(kept)), key=lambda i: pair_tokens(kept[i]))
        total -= pair_tokens(kept.pop(longest))
    return kept if total <= max_tokens else None


LOSS_ON = ("query", "outputs", "all-outputs")  # which outputs of a training sequence carry loss (encode_example)


def symbol_id(tokenizer: Any, symbol: str, vocab: dict[str, int]) -> int | None:
    """The id of the bare token for `symbol`, None when there is none. The bare piece itself where the
    vocabulary has it (a SentencePiece tokenizer's "5", not its word-initial "▁5"); else what the symbol alone
    encodes to when that is one token (byte-level BPE's "Ċ" for the newline; `vocab` is the tokenizer's); else,
    where the tokenizer puts a dummy prefix in front ("5" -> "▁", "5"; "\n" -> "▁", "<0x0A>"), the token among
    those that decodes to it."""
    if symbol in vocab:
        return int(vocab[symbol])
    ids = tokenizer.encode(symbol, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    bare = [i for i in ids if tokenizer.decode([i]) == symbol]
    return int(bare[-1]) if len(bare) == 1 else None


@dataclass(frozen=True)
class GridFormat:
    """The token ids of the format's symbols for one tokenizer."""

    digit_ids: tuple[int, ...]
    row_end_id: int
    input_id: int
    output_id: int
    eos_id: int
    bos_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, where: str = "tokenizer") -> GridFormat:
        """Read the ids from a HF tokenizer (`symbol_id`); refuse one that lacks a symbol, in one line naming
        `where` (the model directory) and every missing symbol."""
        if tokenizer.eos_token_id is None:
            raise FormatError(f"{where}: the tokenizer has no EOS token")
        symbols = [*DIGITS, ROW_END, INPUT_MARK, OUTPUT_MARK]
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        found = {symbol: symbol_id(tokenizer, symbol, vocab) for symbol in symbols}
        missing = [symbol for symbol, found_id in found.items() if found_id is None]
        if missing:
            raise FormatError(f"{where}: the tokenizer has no single token for {', '.join(map(repr, missing))}; "
                              "the grid format needs one for every digit, the newline and the markers 'I'/'O'")
        fmt = cls(tuple(found[d] for d in DIGITS), found[ROW_END], found[INPUT_MARK], found[OUTPUT_MARK],
                  int(tokenizer.eos_token_id), tokenizer.bos_token_id)
        ids = [*fmt.digit_ids, fmt.row_end_id, fmt.input_id, fmt.output_id, fmt.eos_id]
        if len(set(ids)) != len(ids):
            raise FormatError(f"{where}: two symbols of the grid format share a token id: {ids}")
        return fmt

    @property
    def grid_vocabulary(self) -> list[int]:
        """The ids an answer may contain: digits, row end, EOS (what decoding is restricted to)."""
        return [*self.digit_ids, self.row_end_id, self.eos_id]

    def encode_grid(self, grid: Grid) -> np.ndarray:
        cells = np.asarray(self.digit_ids, dtype=np.int64)[grid]
        row_ends = np.full((grid.shape[0], 1), self.row_end_id, dtype=np.int64)
        return np.concatenate([cells, row_ends], axis=1).ravel()

    def encode_prompt(self, demos: Sequence[Pair], query_input: Grid) -> np.ndarray:
        """Demonstrations, then the query input and the output marker: what the model continues."""
        parts = [] if self.bos_id is None else [np.array([self.bos_id])]
        for pair in demos:
            parts += [np.array([self.input_id]), self.encode_grid(pair.input), np.array([self.output_id]),
                      self.encode_grid(pair.output), np.array([self.eos_id])]
        parts += [np.array([self.input_id]), self.encode_grid(query_input), np.array([self.output_id])]
        return np.concatenate(parts).astype(np.int64)

    def encode_answer(self, grid: Grid) -> np.ndarray:
        """The continuation the model must produce for an output grid: its rows, then EOS."""
        return np.append(self.encode_grid(grid), self.eos_id)

    def encode_example(self, demos: Sequence[Pair], query: Pair, loss_on: str = "query"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Ids (`encode_prompt` + `encode_answer`) and labels of a training sequence. The query output and its EOS
        carry loss; with `loss_on` "outputs" every demonstration output after the first too (each follows
        examples of the rule, as the query's does), with "all-outputs" the first as well (the MIT paper's
        variants: loss on the demonstration outputs was worth 3 points there)."""
        if loss_on not in LOSS_ON:
            raise ValueError(f"unknown loss_on {loss_on!r}: choose from {', '.join(LOSS_ON)}")
        ids = [] if self.bos_id is None else [np.array([self.bos_id])]
        labels = [np.full(len(ids), IGNORE, dtype=np.int64)]
        pairs = [*demos, query]
        for i, pair in enumerate(pairs):
            head = np.concatenate([[self.input_id], self.encode_grid(pair.input), [self.output_id]])
            answer = self.encode_answer(pair.output)
            learned = i == len(pairs) - 1 or loss_on == "all-outputs" or (loss_on == "outputs" and i > 0)
            ids += [head, answer]
            labels += [np.full(len(head), IGNORE, dtype=np.int64),
                       answer if learned else np.full(len(answer), IGNORE, dtype=np.int64)]
        return np.concatenate(ids).astype(np.int64), np.concatenate(labels).astype(np.int64)

    def parse_grid(self, ids: Sequence[int]) -> Grid:
        """Generated ids (after the output marker) back to a grid. Stops at the first EOS, which must come;
        rejects any other token, ragged rows and sides outside 1..30 with a FormatError saying why."""
        ids = list(ids)
        if self.eos_id not in ids:
            raise FormatError(f"no EOS in {len(ids)} generated tokens (output cut off)")
        body = ids[:ids.index(self.eos_id)]
        if not body or body[-1] != self.row_end_id:
            raise FormatError("output does not end with a complete row")
        digit_of = {tid: d for d, tid in enumerate(self.digit_ids)}
        rows, row = [], []
        for tid in body:
            if tid == self.row_end_id:
                if not row:
                    raise FormatError(f"empty row {len(rows)}")
                rows.append(row)
                row = []
            elif tid in digit_of:
                row.append(digit_of[tid])
            else:
                raise FormatError(f"token {tid} is not a digit or a row end")
        if len(rows) > MAX_SIDE or len(rows[0]) > MAX_SIDE:
            raise FormatError(f"grid of {len(rows)}x{len(rows[0])} exceeds {MAX_SIDE}x{MAX_SIDE}")
        if any(len(r) != len(rows[0]) for r in rows):
            raise FormatError(f"ragged rows: lengths {[len(r) for r in rows]}")
        return np.array(rows, dtype=np.uint8)


def grid_step(fmt: GridFormat, max_side: int, width: np.ndarray, line: np.ndarray, lines: np.ndarray,
              tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One token further into answers whose state is (width of the first row, 0 until it ends; digits in the
    current row; rows ended), element-wise: the new state and whether each answer is now doomed (it can no
    longer parse as a grid of at most `max_side` rows and columns). Shared by `GridWatch` (one answer per row
    of a decoding batch) and kit/decode.py's DFS (every child of a node at once)."""
    digit = np.isin(tokens, fmt.digit_ids)
    row_end, eos = tokens == fmt.row_end_id, tokens == fmt.eos_id
    line = line + digit
    doomed = ~(digit | row_end | eos) | (line > np.where(width > 0, width, max_side))
    doomed |= row_end & ((line == 0) | ((width > 0) & (line != width)))
    doomed |= eos & (line > 0)
    width = np.where(row_end & (width == 0), line, width)
    lines = lines + row_end
    doomed |= lines > max_side
    return width, np.where(row_end, 0, line), lines, doomed


class GridWatch:
    """Follows decoded answers token by token and flags each as soon as it can no longer parse as a grid of at
    most `max_side` rows and columns (an empty or ragged row, a row or a column too long, EOS inside a row): its
    decoding can stop there instead of running on to the token budget, which a runaway view of a batch otherwise
    makes every row pay for."""

    def __init__(self, fmt: GridFormat, rows: int, max_side: int = MAX_SIDE):
        self.fmt, self.max_side = fmt, max_side
        self.width = np.zeros(rows, np.int64)  # of the first row, 0 until it ends
        self.line = np.zeros(rows, np.int64)  # digits in the current row
        self.lines = np.zeros(rows, np.int64)  # rows ended
        self.doomed = np.zeros(rows, bool)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Take each answer's next token; True where that answer is doomed (from then on)."""
        self.width, self.line, self.lines, doomed = grid_step(self.fmt, self.max_side, self.width, self.line,
                                                              self.lines, tokens)
        self.doomed |= doomed
        return self.doomed.copy()
