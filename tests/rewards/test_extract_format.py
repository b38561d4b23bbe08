"""Pure functions: answer extraction, format, reflection counter (hand-written expectations)."""
import pytest

from rewards.extract import boxed_contents, extract_answer, last_answer_block
from rewards.format import format_score
from rewards.reflection import count_reflection_words


@pytest.mark.parametrize("text,expected", [
    ("<think>x</think><answer>42</answer>", ("42", "ok")),
    ("<answer>1</answer> then <answer> 2 </answer>", ("2", "ok")),               # last block wins
    ("<answer>so \\boxed{7}</answer>", ("7", "ok")),                             # box inside block
    ("\\boxed{\\{1,2\\}}", ("\\{1,2\\}", "ok")),                                 # escaped braces
    ("\\boxed{\\frac{1}{2}}", ("\\frac{1}{2}", "ok")),                           # nested braces
    ("the answer is \\boxed{3}", ("3", "ok")),
    ("\\boxed{3} or maybe \\boxed{4}", (None, "multiple_boxed")),
    ("<answer>\\boxed{3} \\boxed{4}</answer>", (None, "multiple_boxed")),
    ("<think>\\boxed{1}</think><answer>\\boxed{2}</answer>", ("2", "ok")),       # only the answer region counts
    ("\\boxed{5} so \\boxed{ 5 }", ("5", "ok")),                                 # same content twice
    ("no answer here", (None, "no_answer")),
    ("<answer>   </answer>", (None, "no_answer")),
    ("\\boxed{", (None, "unbalanced_braces")),
    ("\\boxed{}", (None, "no_answer")),
    ("<answer>unclosed", (None, "no_answer")),
    ("\\fbox{9}", ("9", "ok")),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_answer_block_and_boxes():
    assert last_answer_block("<answer>a</answer><answer>b") == "a"
    assert boxed_contents("\\boxed{a}\\boxed {b}") == (["a", "b"], False)


@pytest.mark.parametrize("text,expected", [
    ("<think>r</think><answer>a</answer>", (1.0, "ok")),
    ("  <think>r</think>\n\n<answer>a</answer>\n", (1.0, "ok")),
    ("reasoning starts inside the block</think><answer>a</answer>", (1.0, "ok")),  # template ends in <think>
    ("<think>r</think><answer>a</answer><|endoftext|>", (1.0, "ok")),
    ("<think>r</think><answer>a</answer></s>", (1.0, "ok")),
    ("<think>r</think><answer>a</answer> more text", (0.0, "text_after_answer")),
    ("<think>r</think> hmm <answer>a</answer>", (0.0, "text_between_blocks")),
    ("<think>r</think>", (0.0, "missing <answer>")),
    ("<answer>a</answer>", (0.0, "missing </think>")),
    ("<think>r</think><think>s</think><answer>a</answer>", (0.0, "repeated </think>")),
    ("<think>r</think><answer>a</answer><answer>b</answer>", (0.0, "repeated <answer>")),
    ("<think> </think><answer>a</answer>", (0.0, "empty_think")),
    ("<think>r</think><answer> </answer>", (0.0, "empty_answer")),
    ("<think>r<answer>a</answer></think>", (0.0, "tags_out_of_order")),
    ("intro <think>r</think><answer>a</answer>", (0.0, "text_before_think")),
    ("", (0.0, "missing </think>")),
])
def test_format_score(text, expected):
    assert format_score(text) == expected


def test_reflection_words():
    assert count_reflection_words("Wait, wait. But however: re-check; recheck. waiting butter") == 6
    assert count_reflection_words("") == 0
